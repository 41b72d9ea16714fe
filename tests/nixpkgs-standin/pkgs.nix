# The package set of the stand-in (tests only): nixpkgs' interface (names, argument
# shapes, output layout, the checks that matter) with nixpkgs' real `lib`.
#
# What is modelled, and how faithfully:
# - fetchurl/fetchzip/fetchFromGitHub/fetchgit: real fixed-output derivations with
#   nixpkgs' names ("source" for trees, the URL's base name for files), so their store
#   paths are the ones nixpkgs would give; their builders use host tools (curl, tar,
#   unzip, git; tests run with sandbox = false) and really fetch (from 127.0.0.1).
# - cudaPackages: nixpkgs' split redist layout (headers in .dev, libraries in .lib, the
#   driver stub libcuda.so in cuda_cudart.stubs, lib/stubs/), buildable as empty marker
#   files so a symlinkJoin of them can be inspected; unfree like the real ones.
# - rocmPackages, vulkan, python: unbuildable leaves carrying versions like those of the
#   pinned release (flake.lock; from its release notes, not read from nixpkgs here), so
#   version floors in nix/ are exercised at evaluation.
# - stdenv.mkDerivation runs a small stand-in of the generic builder (setup.sh);
#   mkShell (inputsFrom, packages, .override { stdenv }) and symlinkJoin are real.
{ lib, system, config }:
final:

let
  parts = builtins.match "([^-]+)-(.+)" system;
  cpu = builtins.elemAt parts 0;
  kernel = builtins.elemAt parts 1;

  hostPlatform = {
    inherit system;
    isLinux = kernel == "linux";
    isDarwin = kernel == "darwin";
    isAarch64 = cpu == "aarch64";
    isx86_64 = cpu == "x86_64";
    isGnu = kernel == "linux";
    isStatic = false;
  };

  # Never built: a builder that says so. Evaluation, drvPath and outPath work.
  unbuildable = name: {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "echo 'nixpkgs stand-in: ${name} cannot be built' >&2; exit 1" ];
  };

  # Like nixpkgs' check-meta: unfree needs config.allowUnfree; platforms are enforced.
  checkMeta = name: meta:
    let
      licenses = lib.toList (meta.license or [ ]);
      free = lib.all (l: l.free or true) licenses;
      platforms = meta.platforms or lib.platforms.all;
      bad = meta.badPlatforms or [ ];
    in
    if !free && !(config.allowUnfree or false) then
      throw "Package '${name}' has an unfree license, refusing to evaluate (stand-in of nixpkgs' check-meta)."
    else if !(lib.elem system platforms) || lib.elem system bad then
      throw "Package '${name}' is not available on the requested hostPlatform ${system} (stand-in of nixpkgs' check-meta)."
    else
      true;

  hostPath = "/usr/local/bin:/usr/bin:/bin";

  # A host tool offered as a package (links whatever of `bins` the host has); only for
  # the tools the buildable stand-in packages need. Impure by design, tests only.
  hostTool = name: bins: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" ''
      PATH=${hostPath}
      mkdir -p $out/bin
      for b in ${builtins.concatStringsSep " " bins}; do
        for d in /usr/local/bin /usr/bin /bin; do
          if [ -x $d/$b ]; then ln -s $d/$b $out/bin/$b; break; fi
        done
      done
    '' ];
  } // { meta = { }; pname = name; version = "host"; };

  leaf = name: extra:
    let meta = extra.meta or { };
    in
    assert checkMeta name meta;
    derivation (unbuildable name) // { inherit meta; pname = name; version = extra.version or "0-standin"; }
    // removeAttrs extra [ "meta" ];

  # A multi-output package whose outputs hold empty marker files at nixpkgs' paths.
  layout = name: version: meta: files:
    assert checkMeta name meta;
    derivation {
      inherit name system;
      outputs = builtins.attrNames files;
      builder = "/bin/sh";
      args = [ "-c" (lib.concatStrings (lib.mapAttrsToList (out: paths: ''
        PATH=${hostPath}
        mkdir -p "''$${out}"
        for f in ${lib.escapeShellArgs paths}; do
          mkdir -p "$(dirname "''$${out}/$f")"; : > "''$${out}/$f"
        done
      '') files)) ];
    } // { inherit meta version; pname = name; };

  # stdenv.mkDerivation: attrs (or finalAttrs: attrs), env merged, passthru and meta kept
  # out of the derivation, overrideAttrs. The derivation's env is the attrs, as in nixpkgs.
  makeStdenv = stdenvName: cc:
    let
      stdenv = {
        inherit hostPlatform;
        buildPlatform = hostPlatform;
        targetPlatform = hostPlatform;
        isDarwin = hostPlatform.isDarwin;
        isLinux = hostPlatform.isLinux;
        inherit cc;
        name = stdenvName;
        mkDerivation = fnOrAttrs:
          let
            attrsFn = if builtins.isFunction fnOrAttrs then fnOrAttrs else (_: fnOrAttrs);
            attrs = attrsFn attrs;
            name = attrs.name or "${attrs.pname}-${attrs.version}";
            env = attrs.env or { };
            clash = builtins.filter (k: attrs ? ${k}) (builtins.attrNames env);
            meta = attrs.meta or { };
            passthru = attrs.passthru or { };
            drvAttrs =
              removeAttrs attrs [ "meta" "passthru" "env" ]
              // env
              // {
                inherit name system;
                # The stand-in generic builder (host tools; tests run with sandbox = false).
                builder = "/bin/bash";
                args = [ ./setup.sh ];
                stdenv = stdenvName;
              };
            drv = derivation drvAttrs;
            drvResult = drv // passthru // {
              inherit meta passthru env;
              overrideAttrs = f: stdenv.mkDerivation (attrs // (if builtins.isFunction (f attrs) then f attrs attrs else f attrs));
            };
          in
          assert clash == [ ] || throw "${name}: env.${builtins.head clash} also set as a derivation attribute";
          assert checkMeta name meta;
          drvResult;
      };
    in
    stdenv;

  gcc = leaf "gcc-wrapper" { version = "14.3.0"; };
  stdenv = makeStdenv "stdenv-${system}" gcc;
  stdenvNoCC = makeStdenv "stdenv-nocc-${system}" null;

  # ---- fetchers: real fixed-output derivations, nixpkgs' names and arguments ----------

  fodAttrs = { name, hash, recursive }: {
    inherit name system;
    outputHashMode = if recursive then "recursive" else "flat";
    outputHash = hash;
    outputHashAlgo = if lib.hasPrefix "sha256-" hash || hash == "" then null else "sha256";
    preferLocalBuild = true;
    impureEnvVars = [ "http_proxy" "https_proxy" "no_proxy" "GIT_CONFIG_COUNT" "GIT_CONFIG_KEY_0" "GIT_CONFIG_VALUE_0" ];
  };

  fetchurl = { url, hash, name ? baseNameOf url, ... }@args:
    derivation (fodAttrs { inherit name hash; recursive = false; } // {
      builder = "/bin/sh";
      args = [ "-c" "PATH=${hostPath}; curl -sSfL --max-time 300 -o \"$out\" ${lib.escapeShellArg url}" ];
      inherit url;
    }) // { inherit url; passthru = { }; };

  fetchzip = { url, hash, name ? "source", stripRoot ? true, ... }:
    derivation (fodAttrs { inherit name hash; recursive = true; } // {
      builder = "/bin/sh";
      args = [ "-c" ''
        set -e
        PATH=${hostPath}
        curl -sSfL --max-time 300 -o "$TMPDIR/download" ${lib.escapeShellArg url}
        mkdir "$TMPDIR/unpack"
        if unzip -qt "$TMPDIR/download" >/dev/null 2>&1; then unzip -q "$TMPDIR/download" -d "$TMPDIR/unpack";
        else tar xf "$TMPDIR/download" -C "$TMPDIR/unpack"; fi
        ${if stripRoot then ''
          [ "$(ls -A "$TMPDIR/unpack" | wc -l)" = 1 ] || { echo "fetchzip: zip does not contain a single top-level directory" >&2; exit 1; }
          mv "$TMPDIR/unpack/$(ls -A "$TMPDIR/unpack")" "$out"
        '' else ''mv "$TMPDIR/unpack" "$out"''}
        chmod -R a-w "$out"
      '' ];
      inherit url;
    }) // { inherit url; };

  fetchgit = { url, rev, hash, fetchSubmodules ? false, leaveDotGit ? false, name ? "source", ... }:
    derivation (fodAttrs { inherit name hash; recursive = true; } // {
      builder = "/bin/sh";
      args = [ "-c" ''
        set -e
        PATH=${hostPath}
        export HOME="$TMPDIR"
        git init -q "$out"; cd "$out"
        git fetch -q ${lib.escapeShellArg url} ${lib.escapeShellArg rev}
        git checkout -q FETCH_HEAD
        ${lib.optionalString fetchSubmodules ''
          git remote add origin ${lib.escapeShellArg url}
          git submodule update -q --init --recursive
        ''}
        ${lib.optionalString (!leaveDotGit) "find \"$out\" -name .git -prune -exec rm -rf {} +"}
      '' ];
      inherit url rev;
    }) // { inherit url rev fetchSubmodules; };

  fetchFromGitHub = { owner, repo, rev ? null, tag ? null, hash, fetchSubmodules ? false, name ? "source", ... }:
    let
      ref = if tag != null then "refs/tags/${tag}" else rev;
      base = "https://github.com/${owner}/${repo}";
    in
    assert (rev == null) != (tag == null) || throw "fetchFromGitHub requires one of either `rev` or `tag` to be provided (not both).";
    (if fetchSubmodules then fetchgit { url = "${base}.git"; rev = if tag != null then "refs/tags/${tag}" else rev; inherit hash fetchSubmodules name; }
     else fetchzip { url = "${base}/archive/${ref}.tar.gz"; inherit hash name; })
    // { inherit owner repo rev tag; };

  # ---- CUDA: nixpkgs' split redist layout --------------------------------------------

  # nixpkgs' default cudaCapabilities (non-Jetson, supported by the default CUDA).
  defaultCudaCapabilities = [ "7.5" "8.0" "8.6" "8.9" "9.0" "10.0" "12.0" ];
  cudaMeta = { license = lib.licenses.unfree; platforms = lib.platforms.linux; };
  cudaVersion = "12.8";
  cudaLayout = name: files: layout "cudaPackages-${name}-${cudaVersion}" cudaVersion cudaMeta files;

  cudaPackages = {
    inherit cudaVersion;
    cudaMajorMinorVersion = cudaVersion;
    backendStdenv = makeStdenv "cuda-backendStdenv-${system}" (leaf "gcc14-wrapper" { version = "14.3.0"; });
    cuda_nvcc = cudaLayout "cuda_nvcc" { out = [ "bin/nvcc" ]; dev = [ "include/crt/host_config.h" ]; };
    cuda_cudart = cudaLayout "cuda_cudart" {
      out = [ "share/doc/cuda_cudart" ];
      dev = [ "include/cuda_runtime.h" "include/cuda.h" ];
      lib = [ "lib/libcudart.so" ];
      static = [ "lib/libcudart_static.a" ];
      stubs = [ "lib/stubs/libcuda.so" ];
    };
    cuda_cccl = cudaLayout "cuda_cccl" { out = [ "share/doc/cuda_cccl" ]; dev = [ "include/nv/target" ]; };
    libcublas = cudaLayout "libcublas" {
      out = [ "share/doc/libcublas" ];
      dev = [ "include/cublas_v2.h" ];
      lib = [ "lib/libcublas.so" "lib/libcublasLt.so" ];
      static = [ "lib/libcublas_static.a" ];
    };
    flags = {
      cudaCapabilities = config.cudaCapabilities or defaultCudaCapabilities;
      dropDot = builtins.replaceStrings [ "." ] [ "" ];
    };
  };

  # ---- ROCm (the pinned release's versions; HIP >= 6.1 is what llama.cpp wants) --------

  rocmVersion = "6.3.3";
  rocmLeaf = name: leaf "rocmPackages-${name}" { version = rocmVersion; meta.platforms = [ "x86_64-linux" ]; };

  rocmPackages = {
    clr = rocmLeaf "clr" // {
      # nixpkgs: clr's LLVM bin/ (clang++ for HIP); localGpuTargets only where the user's
      # config names rocmGpuTargets (absent here: the full list applies)
      hipClangPath = "${rocmLeaf "clang"}/bin";
      gpuTargets = [ "gfx900" "gfx906" "gfx908" "gfx90a" "gfx942" "gfx1010" "gfx1012" "gfx1030" "gfx1100" "gfx1101" "gfx1102" "gfx1200" "gfx1201" ];
    };
    hipblas = rocmLeaf "hipblas";
    rocblas = rocmLeaf "rocblas";
    rocm-device-libs = rocmLeaf "rocm-device-libs";
    llvm.clang = rocmLeaf "clang";
  };

  # ---- Python ---------------------------------------------------------------------

  pythonVersion = "3.13";
  python = leaf "python3-${pythonVersion}" { inherit pythonVersion; version = pythonVersion; };

  pyLeaf = name: leaf "python${pythonVersion}-${name}" { };
  python3Packages = {
    inherit python;
    buildPythonApplication = attrs:
      assert attrs ? pname && attrs ? version;
      stdenv.mkDerivation (removeAttrs attrs [ "dependencies" "build-system" ] // {
        # nixpkgs' python builder: runtime deps are propagated, build-system is native.
        propagatedBuildInputs = attrs.dependencies or [ ];
        nativeBuildInputs = (attrs.build-system or [ ]) ++ (attrs.nativeBuildInputs or [ ]);
        passthru = (attrs.passthru or { }) // {
          inherit (attrs) pname;
          dependencies = attrs.dependencies or [ ];
          build-system = attrs.build-system or [ ];
        };
      });
    pytestCheckHook = pyLeaf "pytest-check-hook";
  } // builtins.listToAttrs (map (n: { name = n; value = pyLeaf n; }) [
    # Names as nixpkgs' python3Packages spells them (checked against nixpkgs); a new
    # pyproject dependency must be added here, and its nixpkgs attribute confirmed.
    "setuptools" "click" "requests" "tqdm" "tomli" "tomli-w" "filelock" "platformdirs"
    "zstandard" "zlib-ng" "pytest" "hypothesis" "gguf" "numpy" "wheel" "pip" "matplotlib" "pyyaml"
    "psutil" "setuptools-scm" "typing-extensions" "huggingface-hub" "urllib3" "certifi" "openai" "tomlkit"
    "cryptography"
  ]);

  python3 = python // {
    pkgs = python3Packages;
    withPackages = f:
      let packages = f python3Packages;
      in leaf "python3-${pythonVersion}-env" { inherit packages; };
  };

  # ---- build-support ----------------------------------------------------------------

  # pkgs/build-support/trivial-builders: one tree of symlinks to every file of `paths`.
  symlinkJoin = { name, paths, postBuild ? "", ... }@args:
    derivation {
      inherit name system;
      builder = "/bin/sh";
      paths = map toString paths;
      args = [ "-c" ''
        set -e
        PATH=${hostPath}
        mkdir -p "$out"
        for p in $paths; do
          (cd "$p" && find . -mindepth 1 -type d) | while read -r d; do mkdir -p "$out/$d"; done
          (cd "$p" && find . ! -type d) | while read -r f; do [ -e "$out/$f" ] || ln -s "$p/$f" "$out/$f"; done
        done
        ${postBuild}
      '' ];
    } // { passthru = { inherit paths; }; inherit paths; };

  # pkgs/build-support/mkshell: inputsFrom's inputs merged (minus those derivations).
  mkShellFn = { stdenv }: { name ? "nix-shell", packages ? [ ], inputsFrom ? [ ], ... }@attrs:
    let
      merge = n: lib.subtractLists inputsFrom (lib.concatMap (d: d.${n} or [ ]) inputsFrom ++ (attrs.${n} or [ ]));
    in
    stdenv.mkDerivation (removeAttrs attrs [ "packages" "inputsFrom" ] // {
      inherit name;
      buildInputs = merge "buildInputs";
      nativeBuildInputs = packages ++ merge "nativeBuildInputs";
      propagatedBuildInputs = merge "propagatedBuildInputs";
      passthru = (attrs.passthru or { }) // { inherit packages inputsFrom; shellStdenv = stdenv.name; };
      # A shell is never built; nix develop reads its environment.
      dontUnpack = true;
    });
in
{
  inherit lib config system stdenv stdenvNoCC cudaPackages rocmPackages python3 python3Packages;
  inherit fetchurl fetchzip fetchgit fetchFromGitHub symlinkJoin;
  callPackage = lib.callPackageWith final;
  mkShell = final.callPackage mkShellFn { };

  cmake = leaf "cmake" { version = "3.31.7"; };
  ninja = leaf "ninja" { };
  pkg-config = leaf "pkg-config" { };
  git = hostTool "git" [ "git" ];
  ccache = leaf "ccache" { };
  unzip = hostTool "unzip" [ "unzip" ];
  zip = hostTool "zip" [ "zip" ];
  gnutar = hostTool "gnutar" [ "tar" ];
  openssl = leaf "openssl" { };
  nodejs = leaf "nodejs" { version = "22.16.0"; };
  nix-prefetch-git = leaf "nix-prefetch-git" { };
  blas = leaf "blas" { meta.available = true; };
  autoAddDriverRunpath = leaf "auto-add-driver-runpath-hook" { };
  patchelf = leaf "patchelf" { version = "0.15.2"; };
  addDriverRunpath = { driverLink = "/run/opengl-driver"; };
  vulkan-headers = leaf "vulkan-headers" { version = "1.4.313.0"; };
  vulkan-loader = leaf "vulkan-loader" { version = "1.4.313.0"; };
  shaderc = leaf "shaderc" { version = "2025.2"; };
  spirv-headers = leaf "spirv-headers" { version = "1.4.313.0"; };
}
