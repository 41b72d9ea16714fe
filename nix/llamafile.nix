# llamafile from the locked source, built with the locked cosmocc.
#
# llamafile's build/config.mk wants its toolchain at .cosmocc/<version> and downloads it
# when missing; we pre-seed that path with the cosmocc derivation so nothing is fetched.
# Its outputs are APE binaries (zip-appended, polyglot headers): no strip, no patchelf.
#
# useCuda: also compile ggml-cuda.so with nvcc inside the derivation (the flags of
# llamafile/cuda.sh: tinyBLAS, static cudart, linked with -lcuda against the driver stub
# like cuda.sh and cuda.c do; minus -march=native and -arch=all, which make builds
# machine-dependent), embed it in the llamafile's zip with zipalign, and embed a `.args`
# of `--nocompile ...`: llamafile otherwise prefers a copy extracted earlier to
# ~/.llamafile/ (llamafile 0.8.4's app directory, llamafile/get_app_dir.c) and then a
# fresh nvcc build of its own over the embedded module. With --nocompile it uses
# ~/.llamafile/ggml-cuda.so if that file exists (llamafile's rule: it is not versioned,
# so delete it after an upgrade) and otherwise extracts the embedded one there.
{
  lib,
  stdenvNoCC,
  cosmocc,
  cudaPackages ? { },
  cudaSupport ? false,
  autoAddDriverRunpath ? null,
  patchelf ? null,
  addDriverRunpath ? { driverLink = "/run/opengl-driver"; },

  src, # the locked source (nix/sources.nix)
  version,
  cosmoccVersion ? cosmocc.version,

  useCuda ? cudaSupport,
  cudaCapabilities ? (cudaPackages.flags or cudaPackages.cudaFlags or { cudaCapabilities = [ ]; }).cudaCapabilities,
  effectiveStdenv ? if useCuda then cudaPackages.backendStdenv else stdenvNoCC,
}:

let
  dropDot = lib.replaceStrings [ "." ] [ "" ];
  # One real-architecture cubin per capability, plus PTX for the newest (forward compat).
  newest = dropDot (lib.last cudaCapabilities);
  gencodeFlags =
    map (c: "-gencode=arch=compute_${dropDot c},code=sm_${dropDot c}") cudaCapabilities
    ++ [ "-gencode=arch=compute_${newest},code=compute_${newest}" ];
  nvccFlags = gencodeFlags ++ [
    "--shared"
    "--forward-unknown-to-host-compiler"
    "-use_fast_math"
    "--compiler-options=-fPIC,-O3"
    "-DNDEBUG"
    "-DGGML_BUILD=1"
    "-DGGML_SHARED=1"
    "-DGGML_CUDA_MMV_Y=1"
    "-DGGML_MULTIPLATFORM"
    "-DGGML_CUDA_DMMV_X=32"
    "-DK_QUANTS_PER_ITERATION=2"
    "-DGGML_CUDA_PEER_MAX_BATCH_SIZE=128"
    "-DGGML_USE_TINYBLAS"
    # The copy embedded in the llamafile is never fixed up, so it carries the driver
    # path itself: libcuda.so.1 is found there on NixOS (elsewhere: ld.so's paths).
    "--linker-options=-rpath,${addDriverRunpath.driverLink}/lib"
  ];
  # ggml-cuda.cu calls the driver API (cuDeviceGet, cuMemCreate, ...): link libcuda
  # like llamafile/cuda.sh, against nixpkgs' stub (cuda_cudart's `stubs` output); the
  # real driver library is loaded at run time. No -lcublas: tinyBLAS replaces it.
  cudaStubs = "${lib.getOutput "stubs" cudaPackages.cuda_cudart}/lib/stubs";
  linkFlags = [ "-L${cudaStubs}" "-lcuda" ];
  # nixpkgs' ld-wrapper adds an -rpath for every store -L directory that supplies a
  # library, so the stub directory above ends up in ggml-cuda.so's RUNPATH, and the copy
  # zipped into the llamafile is never fixed up: on a machine without the driver
  # directory the stub libcuda.so.1 would load instead of the driver. Before zipping,
  # drop stub entries from the RUNPATH as nixpkgs' cudaPackages.removeStubsFromRunpathHook
  # does for installed files (pkgs/development/cuda-modules/.../removeStubsFromRunpathHook:
  # entries ending in /lib/stubs or -stubs/lib go, the driver directory is kept once).
  driverLib = "${addDriverRunpath.driverLink}/lib";
  stripStubsFromRunpath = ''
    stripStubsFromRunpath() {
      local entry new="" seen=":"
      local -a entries=()
      IFS=: read -ra entries <<< "$(patchelf --print-rpath "$1")"
      for entry in ${driverLib} "''${entries[@]}"; do
        case "$entry" in
          "" | */lib/stubs | */lib/stubs/ | *-stubs/lib) continue ;;
        esac
        case "$seen" in *":$entry:"*) continue ;; esac
        seen="$seen$entry:"
        new="''${new:+$new:}$entry"
      done
      patchelf --set-rpath "$new" "$1"
    }
  '';
  # Arguments llamafile reads from its own zip (`...` = the user's arguments).
  zipArgs = [ "--nocompile" "..." ];
  seedName = lib.escapeShellArg cosmoccVersion;
in

assert !useCuda || cudaCapabilities != [ ] || throw "llamafile-cuda: cudaCapabilities is empty";

effectiveStdenv.mkDerivation {
  pname = "llamafile" + lib.optionalString useCuda "-cuda";
  inherit version src;

  nativeBuildInputs = lib.optionals useCuda [ cudaPackages.cuda_nvcc autoAddDriverRunpath patchelf ];
  buildInputs = lib.optionals useCuda (with cudaPackages; [ cuda_cudart libcublas ]);

  # Where llamafile's Makefile expects cosmocc; its download rule targets this directory
  # and never fires when it exists. The download script is replaced by one that fails
  # loudly, so a changed Makefile cannot quietly reach for the network.
  postPatch = ''
    mkdir -p .cosmocc
    rm -rf .cosmocc/${seedName}
    ln -s ${cosmocc} .cosmocc/${seedName}
    if [ -e build/download-cosmocc.sh ]; then
      printf '%s\n' '#!/bin/sh' ${lib.escapeShellArg "echo 'pylmserv: cosmocc is pre-seeded at .cosmocc/${cosmoccVersion}; no downloads in a Nix build' >&2"} 'exit 1' > build/download-cosmocc.sh
      chmod +x build/download-cosmocc.sh
    fi
  '';

  # cosmocc's tools are APE programs: the shell runs them and the APE loader unpacks
  # itself under $HOME or $TMPDIR, which must be writable (HOME is /homeless-shelter).
  # preBuild, not preConfigure: with dontConfigure the configure hooks never run; the
  # export lasts through the install phase (zipalign is an APE program too).
  dontConfigure = true;
  preBuild = ''
    export HOME=$TMPDIR
    export TMPDIR
  '';

  enableParallelBuilding = true;
  makeFlags = [ "PREFIX=${placeholder "out"}" ];

  postBuild = lib.optionalString useCuda ''
    # Compile ggml-cuda.so the way llamafile does at run time: its sources flattened
    # into one directory, then nvcc for the pinned GPU architectures.
    mkdir -p cuda-build
    for f in llama.cpp/ggml-cuda.cu llama.cpp/ggml-cuda.h llama.cpp/ggml-impl.h \
             llama.cpp/ggml-alloc.h llama.cpp/ggml-common.h llama.cpp/ggml-backend.h \
             llama.cpp/ggml-backend-impl.h llama.cpp/ggml.h llamafile/tinyblas.h \
             llamafile/tinyblas.cu llamafile/llamafile.h; do
      if [ -e "$f" ]; then cp "$f" cuda-build/; fi
    done
    (cd cuda-build && nvcc ${lib.escapeShellArgs nvccFlags} -o ggml-cuda.so ggml-cuda.cu ${lib.escapeShellArgs linkFlags})
    ${stripStubsFromRunpath}
    stripStubsFromRunpath cuda-build/ggml-cuda.so
  '';

  postInstall = lib.optionalString useCuda ''
    install -Dm755 cuda-build/ggml-cuda.so $out/lib/ggml-cuda.so
    # Embed it (llamafile extracts /zip/ggml-cuda.so and dlopen()s it) and the
    # --nocompile default, both at the top of the zip.
    printf '%s\n' ${lib.escapeShellArgs zipArgs} > cuda-build/.args
    (cd cuda-build && $out/bin/zipalign -j0 $out/bin/llamafile ggml-cuda.so .args)
  '';

  dontStrip = true;
  dontPatchELF = true;
  dontPatchShebangs = true;

  passthru = {
    inherit cosmocc cosmoccVersion useCuda;
    cosmoccSeed = ".cosmocc/${cosmoccVersion}";
    nvccFlags = if useCuda then nvccFlags else [ ];
    linkFlags = if useCuda then linkFlags else [ ];
    zipArgs = if useCuda then zipArgs else [ ];
    stripStubsFromRunpath = if useCuda then stripStubsFromRunpath else "";
  };

  meta = {
    description = "llamafile ${version}${lib.optionalString useCuda " with embedded ggml-cuda.so"}, pinned by pylmserv.lock";
    homepage = "https://github.com/Mozilla-Ocho/llamafile";
    license = lib.licenses.asl20;
    mainProgram = "llamafile";
    # Linux until a darwin build has been seen (it needs cosmocc, linux-only here).
    platforms = if useCuda then [ "x86_64-linux" ] else lib.platforms.linux;
  };
}
