#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for pylmserv development and its tests:
# system tools (Nix as the hash oracle, compilers, ccache), the package with its test
# extras, and the real llama.cpp source (inside llama-cpp-python's sdist) cached for the
# end-to-end build test. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Every tool the tests run: Nix (hash oracle), git, zip/unzip (archive and llamafile tests),
# tar/xz/zstd, compilers, make, ccache, mount/umount (util-linux: the tmpfs disk-full tests).
$SUDO apt-get install -y -qq --no-install-recommends \
  nix-bin git zip unzip tar xz-utils zstd ccache ninja-build cmake curl gcc g++ make util-linux \
  python3-venv >/dev/null
# Backend toolkits the tests check against for real: binutils (readelf/nm link checks),
# patchelf (the flake's RUNPATH fix of llamafile-cuda's embedded module),
# Debian's hipcc 5.2 (the too-old ROCm refusal), the Vulkan SDK packages + lavapipe
# (header check, doctor --backend vulkan), OpenBLAS (--backend blas).
$SUDO apt-get install -y -qq --no-install-recommends \
  binutils patchelf hipcc glslc libvulkan-dev spirv-headers mesa-vulkan-drivers vulkan-tools libopenblas-dev >/dev/null
# nginx-light: serves a signed Nix binary cache on 127.0.0.1 (tests/test_flake_signed_cache.py), is a
# mirror (a store's blobs/ served read-only) and the origin of benchmarks/bench_fetch.py; aria2c is
# that benchmark's parallel, checksumming baseline (curl is above). Sharing (tests/test_oci.py,
# test_share*.py): a real OCI registry (CNCF distribution) with htpasswd logins, skopeo to read and
# copy what pylmserv writes.
$SUDO apt-get install -y -qq --no-install-recommends \
  nginx-light aria2 docker-registry apache2-utils skopeo >/dev/null
# systemd: `systemd-analyze verify` checks the units `serve --generate systemd` prints.
$SUDO apt-get install -y -qq --no-install-recommends systemd >/dev/null
python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python3 -m pip install -q -e '.[test]'
# cuBLAS for the real ggml-cuda.cu link tests (--cuda-blas cublas), where the machine has
# nvcc (a CUDA toolkit is "whatever the machine has"): NVIDIA's PyPI wheel of the same
# CUDA major.minor as nvcc (nvidia-cublas 13.0.x for CUDA 13.0: nvidia/cu13/lib, where
# pylmserv's detect_cublas and the tests look).
if command -v nvcc >/dev/null 2>&1; then
  cuda=$(nvcc --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1)
  if [ -n "$cuda" ]; then
    python3 -m pip install -q "nvidia-cublas==$cuda.*"
  fi
fi
cache="${PYLMSERV_TEST_CACHE:-$HOME/.cache/pylmserv-tests}"
mkdir -p "$cache"
ver=$(python3 -c 'from tests.support.llama_source import SDIST_VERSION; print(SDIST_VERSION)' 2>/dev/null || echo 0.3.36)
if [ ! -f "$cache/llama_cpp_python-$ver.tar.gz" ]; then
  # --no-binary for this one package only: ":all:" would also build its build requirements
  # (CMake) from source, about an hour on a cold pip cache.
  python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$ver" -d "$cache"
fi
# llama-cpp-python 0.3.9's llama.cpp (May 2025): the Vulkan header check accepts it on
# Debian 12's headers (and scripts/backends-check.sh builds and runs it on lavapipe).
if [ ! -f "$cache/llama_cpp_python-0.3.9.tar.gz" ]; then
  python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==0.3.9" -d "$cache"
fi
echo "setup done"
