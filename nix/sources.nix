# pylmserv.lock -> fixed-output derivations, with Nix's builtin fetchers only.
#
# No nixpkgs here: every entry builds (and verifies its hash) on a bare Nix, and lands on
# the store path nixpkgs' fetchers would give for the same pin, because a fixed-output
# path depends only on (hash mode, hash, name):
#   mode = "flat"  files   -> builder = "builtin:fetchurl", name = the file's base name
#                             (what nixpkgs' fetchurl names it).
#   mode = "nar"   trees   -> name = "source" (what fetchFromGitHub/fetchzip/fetchgit
#                             name it), NAR sha256 of the unpacked tree.
#
# Trees: Nix 2.8's `builtin:fetchurl` with `unpack = true` restores a *NAR*, it does not
# unpack tarballs, so a build-time builtin tree fetcher does not exist. Trees are fetched
# at evaluation time instead, by `builtins.fetchTarball` (strips the single top-level
# directory exactly like fetchzip/fetchFromGitHub) or `builtins.fetchGit` (submodules,
# no .git, like fetchgit), both checking the locked hash. They are then exposed as a
# fixed-output derivation with the same hash and name: its output path *is* the fetched
# path, so it is already valid and its builder never runs. `nix build .#source-NAME`
# therefore fetches, verifies and roots the tree without nixpkgs.
{ lock }:

let
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

  fetchTree = kind: name: entry:
    let
      url = need kind name entry "url";
      hash = need kind name entry "hash";
      type = entry.type or "url";
      submodules = entry.submodules or false;
      viaGit = type == "git" || (type == "github" && submodules);
      gitUrl =
        entry.git_url or (if type == "github" then "https://github.com/${entry.owner}/${entry.repo}.git" else url);
      rev = entry.rev or null;
      tree =
        if viaGit then
          if isCommit rev then
            let
              checkout = builtins.fetchGit ({
                url = gitUrl;
                inherit rev submodules;
                name = "source";
                allRefs = true;
              } // (if hash == "" then { } else { narHash = hash; }));
            in
            # The empty-hash trick, for git too: report what the checkout hashes to.
            if hash == "" then
              throw "pylmserv.lock: [${kind}.${name}] has an empty hash; hash mismatch in fixed-output derivation '${gitUrl}?rev=${rev}':\n  got:    ${checkout.narHash}"
            else
              checkout.outPath
          else
            throw "pylmserv.lock: [${kind}.${name}] is fetched with git (submodules = ${builtins.toJSON submodules}) but rev ${builtins.toJSON rev} is not a full commit hash; run `pylmserv prefetch --refresh`"
        else
          builtins.fetchTarball {
            inherit url;
            name = "source";
            sha256 = hash;
          };
    in
    asTreeDerivation { inherit tree hash url; };

  # One lock entry -> its derivation, with the pin attached for inspection.
  fetchEntry = kind: name: entry:
    let
      mode = need kind name entry "mode";
      url = need kind name entry "url";
      hash = need kind name entry "hash";
      drv =
        if mode == "flat" then
          fetchFlat {
            name = sanitize (baseName (entry.file or url));
            inherit url hash;
          }
        else if mode == "nar" then
          fetchTree kind name entry
        else
          throw "pylmserv.lock: [${kind}.${name}] has mode ${builtins.toJSON mode}; expected \"flat\" or \"nar\"";
    in
    drv // {
      pin = entry // { inherit kind name; };
      lockName = name;
      version = entry.version or entry.rev or "0";
    };

  mapEntries = kind: builtins.mapAttrs (fetchEntry kind) (lock.${kind} or { });

  lockVersion = lock.version or null;
in
# Version 2 (typed pins: type = file|archive|git|github|hf, git_url, fetcher) reads like
# version 1 here: the keys this file uses kept their meaning.
assert lockVersion == 1 || lockVersion == 2
  || throw "pylmserv.lock: unsupported lock version ${builtins.toJSON lockVersion} (this flake reads versions 1 and 2)";
{
  sources = mapEntries "sources";
  models = mapEntries "models";
  inherit sanitize baseName;
}
