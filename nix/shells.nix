# Development shells: `nix develop` (CPU work, llamafile with cosmocc), `.#cuda`, `.#rocm`.
# Inside, `pylmserv build` finds the compilers and libraries the packages use:
# - the inputs of the matching llama-cpp package (inputsFrom), built with its stdenv
#   (CUDA: cudaPackages.backendStdenv, the host compiler nvcc supports);
# - CUDA: one CUDA_PATH with nvcc, headers and libraries together (nixpkgs splits them
#   over packages and outputs; pylmserv's preflight looks for cuBLAS under CUDA_PATH);
# - `pylmserv` itself: an editable install of the working tree in a venv outside the
#   tree, on PATH, so it runs from any directory and sees source edits at once;
# - cosmocc: the locked cosmocc zip, placed in pylmserv's content-addressed blob store
#   (blobs/sha256/<hex of the lock's hash>), so `pylmserv build llamafile` uses it
#   instead of downloading it again. The path is the hash: it is only ever used for the
#   pin whose hash it is.
{
  lib,
  stdenv,
  mkShell,
  symlinkJoin,
  python3,
  ccache,
  unzip,
  nix-prefetch-git,
  cosmocc,
  cosmoccZip, # the locked cosmocc release zip (flat FOD)
  pylmserv,
  llama-cpp, # the matching llama-cpp package: its inputs and stdenv
  cudaPackages ? { },
  rocmPackages ? { },
  variant ? "default", # default | cuda | rocm
}:

let
  python = python3.withPackages (ps: map (n: ps.${n})
    (pylmserv.requirements ++ pylmserv.testRequirements ++ [ "pytest" "pip" "setuptools" "wheel" ]));

  # Every output of every part (bin/ from .out, include/ from .dev, lib/ from .lib,
  # the driver stub from cuda_cudart.stubs): one tree, like a toolkit install.
  allOutputs = p: map (o: p.${o}) (p.outputs or [ "out" ]);
  # The driver stub is for linking only (CMake's FindCUDAToolkit looks in lib/stubs): a
  # libcuda.so(.1) directly in lib/ would be found at run time instead of the driver.
  cudaParts = with cudaPackages; [ cuda_nvcc cuda_cudart (cudaPackages.cuda_cccl or cudaPackages.cccl) libcublas ];
  cudaRoot = symlinkJoin {
    name = "cuda-merged-${cudaPackages.cudaVersion or "unknown"}";
    paths = lib.concatMap allOutputs cudaParts;
    postBuild = ''
      rm -f "$out/lib/libcuda.so" "$out/lib/libcuda.so.1"
    '';
  };

  shellStdenv = if variant == "cuda" then cudaPackages.backendStdenv else stdenv;

  sri = cosmoccZip.outputHash;
  b64 = builtins.head (builtins.match "sha256-(.*)" sri);
in

assert lib.elem variant [ "default" "cuda" "rocm" ];
assert lib.hasPrefix "sha256-" sri || throw "shells.nix: the cosmocc pin's hash ${sri} is not an SRI sha256";

(mkShell.override { stdenv = shellStdenv; }) ({
  name = "pylmserv-${variant}";
  inputsFrom = [ llama-cpp ];
  packages = [ python ccache unzip nix-prefetch-git ]
    ++ lib.optionals stdenv.hostPlatform.isLinux [ cosmocc ]  # linux-only (nix/cosmocc.nix)
    ++ lib.optionals (variant == "cuda") cudaParts;

  PYLMSERV_COSMOCC_ZIP = "${cosmoccZip}";

  passthru = { inherit cudaRoot cudaParts; };
}
# Only the shell of that backend sets its variables: an exported empty CUDA_PATH is not
# "no CUDA" to every tool.
// lib.optionalAttrs (variant == "cuda") { CUDA_PATH = "${cudaRoot}"; }
// lib.optionalAttrs (variant == "rocm") {
  ROCM_PATH = "${rocmPackages.clr}";
  HIP_DEVICE_LIB_PATH = "${rocmPackages.rocm-device-libs}/amdgcn/bitcode";
} // {

  shellHook = ''
    export CCACHE_DIR="''${CCACHE_DIR:-$HOME/.cache/ccache}"

    # pylmserv from the working tree: an editable install in a venv outside the tree.
    # compat mode: the tree goes on sys.path ahead of the Python env's site-packages.
    pylmserv_root="$PWD"
    while [ "$pylmserv_root" != / ] && ! grep -qs '^name = "pylmserv"' "$pylmserv_root/pyproject.toml"; do
      pylmserv_root="$(dirname "$pylmserv_root")"
    done
    if [ "$pylmserv_root" != / ]; then
      pylmserv_venv="''${XDG_CACHE_HOME:-$HOME/.cache}/pylmserv-devshell/$(printf '%s' "$pylmserv_root" | cksum | cut -d' ' -f1)"
      if [ ! -x "$pylmserv_venv/bin/pylmserv" ]; then
        python -m venv --system-site-packages --without-pip "$pylmserv_venv" \
          && "$pylmserv_venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation --no-index \
               --config-settings editable_mode=compat -e "$pylmserv_root" >&2 \
          || echo "pylmserv dev shell: editable install of $pylmserv_root failed" >&2
      fi
      export PATH="$pylmserv_venv/bin:$PATH"
    fi

    # The locked cosmocc zip, where pylmserv looks for a verified blob of that hash.
    case "$(uname -s)" in
      Darwin) pylmserv_home="''${PYLMSERV_HOME:-$HOME/Library/Caches/pylmserv}" ;;
      *) pylmserv_home="''${PYLMSERV_HOME:-''${XDG_CACHE_HOME:-$HOME/.cache}/pylmserv}" ;;
    esac
    pylmserv_blob="$pylmserv_home/blobs/sha256/$(printf '%s' ${lib.escapeShellArg b64} | base64 -d | od -An -v -tx1 | tr -d ' \n')"
    if [ ! -e "$pylmserv_blob" ] && mkdir -p "$(dirname "$pylmserv_blob")"; then
      cp "$PYLMSERV_COSMOCC_ZIP" "$pylmserv_blob.tmp.$$" && chmod 0444 "$pylmserv_blob.tmp.$$" \
        && mv "$pylmserv_blob.tmp.$$" "$pylmserv_blob"
    fi
    unset pylmserv_root pylmserv_venv pylmserv_home pylmserv_blob
  '';
})
