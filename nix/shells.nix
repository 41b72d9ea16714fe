# Development shells: `nix develop` (CPU work, llamafile with cosmocc), `.#cuda`, `.#rocm`.
# Inside, `pylmserv build` finds the same compilers and libraries the packages use.
{
  lib,
  mkShell,
  python3,
  cmake,
  ninja,
  ccache,
  git,
  unzip,
  pkg-config,
  nix-prefetch-git,
  cosmocc,
  pylmserv,
  cudaPackages ? { },
  rocmPackages ? { },
  variant ? "default", # default | cuda | rocm
}:

let
  python = python3.withPackages (ps: map (n: ps.${n}) (pylmserv.requirements ++ pylmserv.testRequirements ++ [ "pytest" ]));

  common = [ python cmake ninja ccache git unzip pkg-config nix-prefetch-git cosmocc ];

  cuda = with cudaPackages; [ cuda_nvcc cuda_cudart cuda_cccl libcublas ];
  rocm = with rocmPackages; [ clr hipblas rocblas ];
in

assert lib.elem variant [ "default" "cuda" "rocm" ];

mkShell {
  name = "pylmserv-${variant}";
  packages = common
    ++ lib.optionals (variant == "cuda") cuda
    ++ lib.optionals (variant == "rocm") rocm;

  # The cosmocc pinned for llamafile, and the working tree's pylmserv first on the path.
  PYLMSERV_COSMOCC = "${cosmocc}";
  COSMOCC_VERSION = cosmocc.version;
  ROCM_PATH = if variant == "rocm" then "${rocmPackages.clr}" else null;
  CUDA_PATH = if variant == "cuda" then "${cudaPackages.cuda_nvcc}" else null;

  shellHook = ''
    export PYTHONPATH="$PWD''${PYTHONPATH:+:$PYTHONPATH}"
    pylmserv() { python -m pylmserv "$@"; }
    export -f pylmserv 2>/dev/null || true
    export CCACHE_DIR="''${CCACHE_DIR:-$HOME/.cache/ccache}"
  '';
}
