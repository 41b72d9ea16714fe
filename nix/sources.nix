# pylmserv.lock -> fixed-output derivations, each with the fetcher its hash is for.
#
# A fixed-output store path depends only on (hash mode, hash, name), so every fetcher
# below lands on the path nixpkgs' fetchers give the same pin:
#   files  (mode = "flat")  fetchurl: flat sha256, name = the file's base name.
#   trees  (mode = "nar")   fetchFromGitHub / fetchzip / fetchgit / builtins.fetchGit:
#                           NAR sha256 of the unpacked tree, name = "source".
#
# Which fetcher (the lock's `fetcher` field; defaults when absent, see `fetcherOf`):
#   fetchurl            Nix's builtin:fetchurl, at build time, no nixpkgs needed.
#   fetchFromGitHub,    with nixpkgs (`pkgs`, every stdenv output and the overlay):
#   fetchzip            nixpkgs' fetcher, at build time: substitutable from a binary
#                       cache, fine under restricted eval, `--rebuild` re-fetches.
#                       Without nixpkgs (the flake's `source-*` outputs): builtins.fetchTree
#                       { type = "tarball"; narHash; } at evaluation time; it is
#                       substituted from a binary cache when the cache has the path.
#   fetchgit            nixpkgs' fetchgit (a checkout; keeps export-ignore files). Needs
#                       nixpkgs even for `source-*`.
#   builtins.fetchGit   Nix's own, at evaluation time. What pylmserv hashes git pins for
#                       when the lock does not say: Nix 2.8 exports the commit with `git
#                       archive` (drops export-ignore files, expands export-subst) unless
#                       submodules = true (then a checkout).
# The tree fetched at evaluation time is exposed as a fixed-output derivation with the
# same hash and name: its output path *is* the fetched path, so its builder never runs.
{
  lock,
  # nixpkgs, or null: builtin fetchers only. Only forced for pins that need it.
  pkgs ? null,
  # true (the `source-*` outputs): builtin fetchers wherever they give the same tree,
  # so those outputs evaluate without nixpkgs. false (stdenv outputs): nixpkgs' fetchers.
  preferBuiltins ? pkgs == null,
}:

let
  # Names become flake attributes (`.#model-NAME`: a dot would split the path) and store
  # path names; versions go into derivation names and build phases.
  validName = name: builtins.match "[A-Za-z0-9_][A-Za-z0-9_-]{0,99}" name != null;
  validVersion = v: builtins.isString v && builtins.match "[A-Za-z0-9][A-Za-z0-9._+-]{0,99}" v != null;

  checkName = kind: name:
    if validName name then name
    else throw "pylmserv.lock: [${kind}.${builtins.toJSON name}] is not a valid name (letters, digits, '_' and '-'; no dots); rename it in pylmserv.toml and run `pylmserv prefetch`";

  # Store path names allow [A-Za-z0-9+._?=-]; anything else becomes "-".
  sanitize = name:
    let
      ok = c: builtins.match "[A-Za-z0-9+._?=-]" c != null;
      chars = builtins.genList (i: builtins.substring i 1 name) (builtins.stringLength name);
      clean = builtins.concatStringsSep "" (map (c: if ok c then c else "-") chars);
      trimmed = builtins.head (builtins.match "[.]*(.*)" clean);
    in
    if trimmed == "" then "download" else trimmed;

  baseName = url:
    let
      noQuery = builtins.head (builtins.split "[?#]" url);
      parts = builtins.filter builtins.isString (builtins.split "/" noQuery);
      nonEmpty = builtins.filter (p: p != "") parts;
    in
    if nonEmpty == [ ] then "download" else builtins.elemAt nonEmpty (builtins.length nonEmpty - 1);

  isCommit = rev: rev != null && builtins.match "[0-9a-f]{40}" rev != null;

  need = kind: name: entry: key:
    entry.${key} or (throw "pylmserv.lock: [${kind}.${name}] has no '${key}'; run `pylmserv prefetch --refresh`");

  isGit = entry: (entry.type or "url") == "git" || ((entry.type or "") == "github" && (entry.submodules or false));

  # The fetcher a pin's hash is for: the lock's `fetcher`, else what pylmserv computes.
  fetcherOf = kind: name: entry:
    let
      mode = need kind name entry "mode";
      github = (entry.type or "") == "github";
      allowed =
        if mode == "flat" then [ "fetchurl" ]
        else if isGit entry then [ "builtins.fetchGit" "fetchgit" ] ++ (if github then [ "fetchFromGitHub" ] else [ ])
        else [ "fetchzip" ] ++ (if github then [ "fetchFromGitHub" ] else [ ]);
      default =
        if mode == "flat" then "fetchurl"
        else if isGit entry then "builtins.fetchGit"
        else if github then "fetchFromGitHub"
        else "fetchzip";
      given = entry.fetcher or default;
    in
    if builtins.elem given allowed then given
    else throw "pylmserv.lock: [${kind}.${name}] has fetcher = ${builtins.toJSON given}; for this pin it must be one of ${builtins.toJSON allowed}";

  nixpkgsFor = kind: name: fetcher:
    if pkgs == null then
      throw "pylmserv.lock: [${kind}.${name}] is pinned for nixpkgs' ${fetcher}; it cannot be fetched without nixpkgs"
    else pkgs;

  # A flat file: exactly what <nix/fetchurl.nix> / nixpkgs' fetchurl produce.
  fetchFlat = { name, url, hash, executable ? false }:
    derivation {
      inherit name url;
      builder = "builtin:fetchurl";
      system = "builtin";
      outputHashMode = if executable then "recursive" else "flat";
      outputHashAlgo = "sha256";
      outputHash = hash;
      inherit executable;
      unpack = false;
      urls = [ url ];
      preferLocalBuild = true;
      impureEnvVars = [ "http_proxy" "https_proxy" "ftp_proxy" "all_proxy" "no_proxy" ];
    };

  # A tree fetched (and verified) at evaluation time, wrapped as the fixed-output
  # derivation whose output path it already occupies (see the header).
  asTreeDerivation = { tree, hash, url }:
    derivation {
      name = "source";
      builder = "builtin:fetchurl";
      system = "builtin";
      # Never run: the output path equals `tree`, an input of this derivation.
      url = "file://${tree}";
      fetchedFrom = url;
      outputHashMode = "recursive";
      outputHashAlgo = "sha256";
      outputHash = hash;
      preferLocalBuild = true;
    };

  # builtins.fetchTree: locked by narHash, so Nix first tries to substitute the path.
  # An empty hash (the "what does it hash to?" trick) goes through fetchTarball, which
  # reports the hash it got.
  builtinTarball = url: hash:
    if hash == "" then builtins.fetchTarball { inherit url; name = "source"; sha256 = hash; }
    else (builtins.fetchTree { type = "tarball"; inherit url; narHash = hash; }).outPath;

  builtinGit = kind: name: entry: hash:
    let
      url = need kind name entry "url";
      gitUrl = entry.git_url or (if (entry.type or "") == "github" then "https://github.com/${entry.owner}/${entry.repo}.git" else url);
      rev = entry.rev or null;
      submodules = entry.submodules or false;
      checkout = builtins.fetchGit ({
        url = gitUrl;
        inherit rev submodules;
        name = "source";
        allRefs = true;
      } // (if hash == "" then { } else { narHash = hash; }));
    in
    if !(isCommit rev) then
      throw "pylmserv.lock: [${kind}.${name}] is fetched with git (submodules = ${builtins.toJSON submodules}) but rev ${builtins.toJSON rev} is not a full commit hash; run `pylmserv prefetch --refresh`"
    # The empty-hash trick, for git too: report what the checkout hashes to.
    else if hash == "" then
      throw "pylmserv.lock: [${kind}.${name}] has an empty hash; hash mismatch in fixed-output derivation '${gitUrl}?rev=${rev}':\n  got:    ${checkout.narHash}"
    else
      checkout.outPath;

  fetchTreeEntry = kind: name: entry: fetcher:
    let
      url = need kind name entry "url";
      hash = need kind name entry "hash";
      rev = entry.rev or null;
      gitUrl = entry.git_url or (if (entry.type or "") == "github" then "https://github.com/${entry.owner}/${entry.repo}.git" else url);
      wrap = tree: asTreeDerivation { inherit tree hash url; };
    in
    if fetcher == "builtins.fetchGit" then
      wrap (builtinGit kind name entry hash)
    else if isGit entry then
      # fetchgit (or fetchFromGitHub with submodules, which is fetchgit): nixpkgs only.
      if !(isCommit rev) then
        throw "pylmserv.lock: [${kind}.${name}] is fetched with git but rev ${builtins.toJSON rev} is not a full commit hash; run `pylmserv prefetch --refresh`"
      else
        (nixpkgsFor kind name fetcher).fetchgit {
          url = gitUrl;
          inherit rev hash;
          fetchSubmodules = entry.submodules or false;
        }
    else if preferBuiltins then
      wrap (builtinTarball url hash)
    else if fetcher == "fetchFromGitHub" then
      (nixpkgsFor kind name fetcher).fetchFromGitHub {
        owner = need kind name entry "owner";
        repo = need kind name entry "repo";
        rev = need kind name entry "rev";
        inherit hash;
      }
    else
      (nixpkgsFor kind name fetcher).fetchzip { inherit url hash; };

  # One lock entry -> its derivation, with the pin attached for inspection.
  fetchEntry = kind: name: entry:
    let
      mode = need kind name entry "mode";
      url = need kind name entry "url";
      hash = need kind name entry "hash";
      fetcher = fetcherOf kind name entry;
      version = entry.version or entry.rev or "0";
      drv =
        if mode == "flat" then
          fetchFlat {
            name = sanitize (baseName (entry.file or url));
            inherit url hash;
          }
        else if mode == "nar" then
          fetchTreeEntry kind name entry fetcher
        else
          throw "pylmserv.lock: [${kind}.${name}] has mode ${builtins.toJSON mode}; expected \"flat\" or \"nar\"";
    in
    assert validVersion version
      || throw "pylmserv.lock: [${kind}.${name}] has version/rev ${builtins.toJSON version}, which is not a plain version string (letters, digits, '.', '_', '+', '-'); run `pylmserv prefetch --refresh ${name}`";
    drv // {
      pin = entry // { inherit kind name fetcher; };
      lockName = name;
      inherit version;
    };

  mapEntries = kind:
    builtins.listToAttrs (map (name: {
      name = checkName kind name;
      value = fetchEntry kind name lock.${kind}.${name};
    }) (builtins.attrNames (lock.${kind} or { })));

  lockVersion = lock.version or null;
in
# Version 2 (typed pins: type = file|archive|git|github|hf, git_url, fetcher) reads like
# version 1 here: the keys this file uses kept their meaning.
assert lockVersion == 1 || lockVersion == 2
  || throw "pylmserv.lock: unsupported lock version ${builtins.toJSON lockVersion} (this flake reads versions 1 and 2)";
{
  sources = mapEntries "sources";
  models = mapEntries "models";
  inherit sanitize baseName validName validVersion;
}
