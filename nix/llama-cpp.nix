# llama.cpp from the locked source, one function with backend switches, modelled on
# llama.cpp's own .devops/nix/package.nix. Variants are overrides:
#   llama-cpp.override { cudaSupport = true; cudaCapabilities = [ "8.9" ]; }
# (nixpkgs' names cudaSupport/rocmSupport and upstream's useCuda/useRocm both work.)
{
  lib,
  stdenv,
  config ? { },
  cmake,
  ninja,
  pkg-config,
  git,
  blas,
  openssl,
  cudaPackages,
  autoAddDriverRunpath,
  rocmPackages,
  vulkan-headers,
  vulkan-loader,
  shaderc,
  spirv-headers,

  # The locked source (nix/sources.nix) and its version (the lock's rev, e.g. "b9941").
  src,
  version,
  # What `llama-server --version` reports: the build number (from a "bNNNN" tag) and
  # the commit (the lock's `commit` when it has one, else its rev). Without these the
  # CMake build asks git, which a source tarball does not have: "version: 0 (unknown)".
  buildNumber ? (let m = builtins.match "b([0-9]+)" version; in if m == null then "0" else builtins.head m),
  buildCommit ? version,

  cudaSupport ? config.cudaSupport or false,
  rocmSupport ? config.rocmSupport or false,
  useCuda ? cudaSupport,
  useRocm ? rocmSupport,
  useVulkan ? false,
  useMetal ? stdenv.hostPlatform.isDarwin && stdenv.hostPlatform.isAarch64,
  # BLAS on the CPU build only: GPU builds do their matrix work on the GPU.
  useBlas ? !(useCuda || useRocm || useVulkan || useMetal) && (blas.meta.available or true),
  # CPU backends as loadable modules, one per x86/ARM feature level, picked at run time
  # (what the Python builder does). GGML_NATIVE=OFF alone would build for a baseline
  # CPU: no AVX/AVX2/FMA/F16C. ggml supports it on x86 everywhere and on ARM Linux.
  cpuAllVariants ? stdenv.hostPlatform.isx86_64 || (stdenv.hostPlatform.isAarch64 && stdenv.hostPlatform.isLinux),

  # CUDA: which GPUs to compile kernels for. Defaults to nixpkgs' choice
  # (config.cudaCapabilities or its default list); override for smaller, faster builds.
  cudaCapabilities ? (cudaPackages.flags or cudaPackages.cudaFlags).cudaCapabilities,
  # ROCm: which AMD GPU targets, ";"-separated (gfx1030;gfx1100...). Like nixpkgs: the
  # user's config.rocmGpuTargets (clr.localGpuTargets) when set, else clr's full list.
  rocmGpuTargets ? lib.concatStringsSep ";" (
    if (rocmPackages.clr.localGpuTargets or null) != null then rocmPackages.clr.localGpuTargets
    else rocmPackages.clr.gpuTargets),

  # CUDA objects must be built with the stdenv nvcc supports (libstdc++ mismatches otherwise).
  effectiveStdenv ? if useCuda then cudaPackages.backendStdenv else stdenv,
}:

let
  inherit (lib) cmakeBool cmakeFeature optionals optionalAttrs;

  gpuBackends = lib.filter (x: x) [ useCuda useRocm useVulkan useMetal ];

  backend =
    if useCuda then "cuda"
    else if useRocm then "rocm"
    else if useVulkan then "vulkan"
    else if useMetal then "metal"
    else if useBlas then "blas"
    else "cpu";

  # "8.6" -> "86": what CMAKE_CUDA_ARCHITECTURES wants.
  dropDot = lib.replaceStrings [ "." ] [ "" ];
  cudaArchitectures = lib.concatStringsSep ";" (map dropDot cudaCapabilities);

  # Version floors of the vendored CMake files (ggml/src/ggml-hip/CMakeLists.txt refuses
  # HIP < 6.1; cmake_minimum_required of ggml-hip is 3.21). tests/test_flake_upstream.py
  # reads them from the source, so a new llama.cpp with higher floors fails a test.
  floors = { hip = "6.1"; cmake = if useRocm then "3.21" else "3.19"; };
  atLeast = what: have: want:
    lib.versionAtLeast have want
    || throw "llama-cpp (${backend}): this nixpkgs has ${what} ${have}, llama.cpp ${version} needs >= ${want}; update the nixpkgs input (nix flake lock --update-input nixpkgs)";

  # --version: build info from the lock instead of git.
  buildInfo = [
    (cmakeFeature "LLAMA_BUILD_NUMBER" buildNumber)
    (cmakeFeature "LLAMA_BUILD_COMMIT" buildCommit)
  ];

  cudaBuildInputs = with cudaPackages; [ cuda_cudart (cudaPackages.cuda_cccl or cudaPackages.cccl) libcublas ];
  rocmBuildInputs = with rocmPackages; [ clr hipblas rocblas ];
  vulkanBuildInputs = [ vulkan-headers vulkan-loader spirv-headers ];
in

assert lib.length gpuBackends <= 1
  || throw "llama-cpp: choose at most one GPU backend (useCuda/cudaSupport, useRocm/rocmSupport, useVulkan, useMetal)";
assert atLeast "cmake" cmake.version floors.cmake;
assert !useRocm || atLeast "ROCm (rocmPackages.clr)" rocmPackages.clr.version floors.hip;

effectiveStdenv.mkDerivation {
  pname = "llama-cpp" + lib.optionalString (backend != "cpu") "-${backend}";
  inherit version src;

  nativeBuildInputs =
    [ cmake ninja pkg-config git ]
    ++ optionals useCuda [ cudaPackages.cuda_nvcc autoAddDriverRunpath ]
    # glslc compiles the shaders at build time: a build tool (cross builds run it here)
    ++ optionals useVulkan [ shaderc ];

  buildInputs =
    [ openssl ]
    ++ optionals useBlas [ blas ]
    ++ optionals useCuda cudaBuildInputs
    ++ optionals useRocm rocmBuildInputs
    ++ optionals useVulkan vulkanBuildInputs;

  cmakeFlags =
    [
      (cmakeBool "LLAMA_BUILD_SERVER" true)
      (cmakeBool "LLAMA_BUILD_TESTS" false)
      (cmakeBool "LLAMA_BUILD_EXAMPLES" false)
      # No web UI: building it needs npm packages (upstream builds them from
      # tools/ui/package-lock.json with importNpmLock, which reads the lock at
      # evaluation time, i.e. from our source FOD: import-from-derivation) and the
      # prebuilt one is downloaded from a Hugging Face bucket during the build, which
      # the sandbox forbids. llama-server serves its API; the browser UI is absent.
      (cmakeBool "LLAMA_BUILD_UI" false)
      (cmakeBool "LLAMA_USE_PREBUILT_UI" false)
      (cmakeBool "BUILD_SHARED_LIBS" true)
      (cmakeBool "CMAKE_SKIP_BUILD_RPATH" true)
      # Portable binaries: never tune for the build machine's CPU...
      (cmakeBool "GGML_NATIVE" false)
      # ...but load the best CPU variant at run time.
      (cmakeBool "GGML_BACKEND_DL" true)
      (cmakeBool "GGML_CPU_ALL_VARIANTS" cpuAllVariants)
      (cmakeFeature "GGML_BACKEND_DIR" "${placeholder "out"}/lib")
      (cmakeBool "GGML_BLAS" useBlas)
      (cmakeBool "GGML_CUDA" useCuda)
      (cmakeBool "GGML_HIP" useRocm)
      (cmakeBool "GGML_VULKAN" useVulkan)
      (cmakeBool "GGML_METAL" useMetal)
    ]
    ++ buildInfo
    ++ optionals useCuda [ (cmakeFeature "CMAKE_CUDA_ARCHITECTURES" cudaArchitectures) ]
    ++ optionals useRocm [
      # the HIP compiler nixpkgs' own ROCm packages use (clr's clang++)
      (cmakeFeature "CMAKE_HIP_COMPILER" "${rocmPackages.clr.hipClangPath}/clang++")
      (cmakeFeature "CMAKE_HIP_ARCHITECTURES" rocmGpuTargets)
    ]
    ++ optionals useMetal [
      (cmakeBool "GGML_METAL_EMBED_LIBRARY" true)
      (cmakeFeature "CMAKE_C_FLAGS" "-D__ARM_FEATURE_DOTPROD=1")
    ];

  # ROCm's compiler finds its runtime and device libraries through these.
  env = optionalAttrs useRocm {
    ROCM_PATH = "${rocmPackages.clr}";
    HIP_DEVICE_LIB_PATH = "${rocmPackages.rocm-device-libs}/amdgcn/bitcode";
  };

  enableParallelBuilding = true;

  passthru = {
    inherit backend useCuda useRocm useVulkan useMetal useBlas cpuAllVariants cudaArchitectures rocmGpuTargets
      buildNumber buildCommit floors;
    webUi = false;
  };

  meta = {
    description = "LLM inference in C/C++ (llama.cpp ${version}, ${backend} backend, no web UI), pinned by pylmserv.lock";
    homepage = "https://github.com/ggml-org/llama.cpp";
    license = lib.licenses.mit;
    mainProgram = "llama-server";
    platforms = if useMetal then lib.platforms.darwin else if useCuda || useRocm then lib.platforms.linux else lib.platforms.unix;
    badPlatforms = optionals (useCuda || useRocm || useVulkan) lib.platforms.darwin;
  };
}
