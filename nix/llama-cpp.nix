# llama.cpp from the locked source, one function with backend switches, modelled on
# llama.cpp's own .devops/nix/package.nix. Variants are overrides:
#   llama-cpp.override { useCuda = true; cudaCapabilities = [ "8.9" ]; }
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

  # The locked source (nix/sources.nix) and its version (the lock's rev, e.g. "b9941").
  src,
  version,

  useCuda ? config.cudaSupport or false,
  useRocm ? config.rocmSupport or false,
  useVulkan ? false,
  useMetal ? stdenv.hostPlatform.isDarwin && stdenv.hostPlatform.isAarch64,
  # BLAS on the CPU build only: GPU builds do their matrix work on the GPU.
  useBlas ? !(useCuda || useRocm || useVulkan || useMetal) && (blas.meta.available or true),

  # CUDA: which GPUs to compile kernels for. Defaults to nixpkgs' choice
  # (config.cudaCapabilities or its default list); override for smaller, faster builds.
  cudaCapabilities ? (cudaPackages.flags or cudaPackages.cudaFlags).cudaCapabilities,
  # ROCm: which AMD GPU targets, ";"-separated (gfx1030;gfx1100...).
  rocmGpuTargets ? lib.concatStringsSep ";" rocmPackages.clr.gpuTargets,

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
in

assert lib.length gpuBackends <= 1
  || throw "llama-cpp: choose at most one GPU backend (useCuda, useRocm, useVulkan, useMetal)";

effectiveStdenv.mkDerivation {
  pname = "llama-cpp" + lib.optionalString (backend != "cpu") "-${backend}";
  inherit version src;

  nativeBuildInputs =
    [ cmake ninja pkg-config git ]
    ++ optionals useCuda [ cudaPackages.cuda_nvcc autoAddDriverRunpath ];

  buildInputs =
    [ openssl ]
    ++ optionals useBlas [ blas ]
    ++ optionals useCuda (with cudaPackages; [ cuda_cudart cuda_cccl libcublas ])
    ++ optionals useRocm (with rocmPackages; [ clr hipblas rocblas ])
    ++ optionals useVulkan [ vulkan-headers vulkan-loader shaderc ];

  cmakeFlags =
    [
      (cmakeBool "LLAMA_BUILD_SERVER" true)
      (cmakeBool "LLAMA_BUILD_TESTS" false)
      (cmakeBool "LLAMA_BUILD_EXAMPLES" false)
      # No downloads during the build: no web UI from npm or a prebuilt bundle, no curl.
      # (Option names differ across llama.cpp versions; unknown ones are ignored by CMake.)
      (cmakeBool "LLAMA_BUILD_UI" false)
      (cmakeBool "LLAMA_USE_PREBUILT_UI" false)
      (cmakeBool "LLAMA_BUILD_WEBUI" false)
      (cmakeBool "LLAMA_CURL" false)
      (cmakeBool "BUILD_SHARED_LIBS" true)
      (cmakeBool "CMAKE_SKIP_BUILD_RPATH" true)
      # Portable binaries: never tune for the build machine's CPU.
      (cmakeBool "GGML_NATIVE" false)
      (cmakeBool "GGML_BLAS" useBlas)
      (cmakeBool "GGML_CUDA" useCuda)
      (cmakeBool "GGML_HIP" useRocm)
      (cmakeBool "GGML_VULKAN" useVulkan)
      (cmakeBool "GGML_METAL" useMetal)
    ]
    ++ optionals useCuda [ (cmakeFeature "CMAKE_CUDA_ARCHITECTURES" cudaArchitectures) ]
    ++ optionals useRocm [
      (cmakeFeature "CMAKE_HIP_COMPILER" "${rocmPackages.llvm.clang}/bin/clang")
      (cmakeFeature "CMAKE_HIP_ARCHITECTURES" rocmGpuTargets)
      (cmakeFeature "AMDGPU_TARGETS" rocmGpuTargets)
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
    inherit backend useCuda useRocm useVulkan useMetal useBlas cudaArchitectures rocmGpuTargets;
  };

  meta = {
    description = "LLM inference in C/C++ (llama.cpp ${version}, ${backend} backend), pinned by pylmserv.lock";
    homepage = "https://github.com/ggml-org/llama.cpp";
    license = lib.licenses.mit;
    mainProgram = "llama-server";
    platforms = if useMetal then lib.platforms.darwin else if useCuda || useRocm then lib.platforms.linux else lib.platforms.unix;
    badPlatforms = optionals (useCuda || useRocm || useVulkan) lib.platforms.darwin;
  };
}
