# The package set of the stand-in: just enough of nixpkgs' interface (names, argument
# shapes, the checks that matter) to evaluate pylmserv's flake and inspect each output.
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
      free = (meta.license or { free = true; }).free or true;
      platforms = meta.platforms or lib.platforms.all;
      bad = meta.badPlatforms or [ ];
    in
    if !free && !(config.allowUnfree or false) then
      throw "Package '${name}' has an unfree license, refusing to evaluate (stand-in of nixpkgs' check-meta)."
    else if !(lib.elem system platforms) || lib.elem system bad then
      throw "Package '${name}' is not available on the requested hostPlatform ${system} (stand-in of nixpkgs' check-meta)."
    else
      true;

  # A host tool offered as a package (links whatever of `bins` the host has); only for
  # the tools the buildable stand-in packages need. Impure by design, tests only.
  hostTool = name: bins: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" ''
      PATH=/usr/bin:/bin
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
    derivation (unbuildable name) // { inherit meta; pname = name; version = "0-standin"; } // removeAttrs extra [ "meta" ];

  unfreeLeaf = name: extra: leaf name (extra // { meta = { license = lib.licenses.unfree; platforms = lib.platforms.linux; }; });

  # stdenv.mkDerivation: attrs (or finalAttrs: attrs), env merged, passthru and meta kept
  # out of the derivation, overrideAttrs. The derivation's env is the attrs, as in nixpkgs.
  makeStdenv = stdenvName: cc:
    let
      stdenv = {
        inherit hostPlatform;
        buildPlatform = hostPlatform;
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
          in
          assert clash == [ ] || throw "${name}: env.${builtins.head clash} also set as a derivation attribute";
          assert checkMeta name meta;
          drv // passthru // {
            inherit meta passthru env;
            overrideAttrs = f: stdenv.mkDerivation (attrs // (if builtins.isFunction (f attrs) then f attrs attrs else f attrs));
          };
      };
    in
    stdenv;

  gcc = leaf "gcc-wrapper" { };
  stdenv = makeStdenv "stdenv-${system}" gcc;
  stdenvNoCC = makeStdenv "stdenv-nocc-${system}" null;

  # nixpkgs' default cudaCapabilities (non-Jetson, supported by the default CUDA).
  defaultCudaCapabilities = [ "5.0" "5.2" "6.0" "6.1" "7.0" "7.5" "8.0" "8.6" "8.9" "9.0" ];

  cudaLeaf = name: unfreeLeaf "cudaPackages-${name}" { };

  cudaPackages = {
    cudaVersion = "12.4";
    backendStdenv = makeStdenv "cuda-backendStdenv-${system}" (leaf "gcc13-wrapper" { });
    cuda_nvcc = cudaLeaf "cuda_nvcc";
    cuda_cudart = cudaLeaf "cuda_cudart";
    cuda_cccl = cudaLeaf "cuda_cccl";
    libcublas = cudaLeaf "libcublas";
    flags = {
      cudaCapabilities = config.cudaCapabilities or defaultCudaCapabilities;
      dropDot = builtins.replaceStrings [ "." ] [ "" ];
    };
  };

  rocmLeaf = name: leaf "rocmPackages-${name}" { meta.platforms = [ "x86_64-linux" ]; };

  rocmPackages = {
    clr = rocmLeaf "clr" // {
      gpuTargets = [ "gfx900" "gfx906" "gfx908" "gfx90a" "gfx940" "gfx941" "gfx942" "gfx1010" "gfx1012" "gfx1030" "gfx1100" "gfx1101" "gfx1102" ];
    };
    hipblas = rocmLeaf "hipblas";
    rocblas = rocmLeaf "rocblas";
    rocm-device-libs = rocmLeaf "rocm-device-libs";
    llvm.clang = rocmLeaf "clang";
  };

  pythonVersion = "3.12";
  python = leaf "python3-${pythonVersion}" { inherit pythonVersion; };

  pyLeaf = name: leaf "python3.12-${name}" { };
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
    "psutil" "setuptools-scm" "typing-extensions" "huggingface-hub" "urllib3" "certifi"
  ]);

  python3 = python // {
    pkgs = python3Packages;
    withPackages = f:
      let packages = f python3Packages;
      in leaf "python3-${pythonVersion}-env" { inherit packages; };
  };
in
{
  inherit lib config system stdenv stdenvNoCC cudaPackages rocmPackages python3 python3Packages;
  callPackage = lib.callPackageWith final;

  mkShell = attrs:
    stdenv.mkDerivation (removeAttrs attrs [ "packages" ] // {
      name = attrs.name or "nix-shell";
      nativeBuildInputs = (attrs.packages or [ ]) ++ (attrs.nativeBuildInputs or [ ]);
      passthru = { packages = attrs.packages or [ ]; };
    });

  cmake = leaf "cmake" { };
  ninja = leaf "ninja" { };
  pkg-config = leaf "pkg-config" { };
  git = leaf "git" { };
  ccache = leaf "ccache" { };
  unzip = hostTool "unzip" [ "unzip" ];
  openssl = leaf "openssl" { };
  nix-prefetch-git = leaf "nix-prefetch-git" { };
  blas = leaf "blas" { meta.available = true; };
  autoAddDriverRunpath = leaf "auto-add-driver-runpath-hook" { };
  addDriverRunpath = { driverLink = "/run/opengl-driver"; };
  vulkan-headers = leaf "vulkan-headers" { };
  vulkan-loader = leaf "vulkan-loader" { };
  shaderc = leaf "shaderc" { };
}
