#!/usr/bin/env bash
# The backend builds that do not fit in CI (hours on 2 cores cold), for a developer to run:
# each backend built by `pylmserv build` from a lock pinning a real llama.cpp source served
# on 127.0.0.1, then run where this machine can (CPU, OpenBLAS, Vulkan on lavapipe), and a
# table printed: backend | compiled here | ran here | cold build time | what was checked.
#
#   scripts/backends-check.sh                      # every row
#   scripts/backends-check.sh --only vulkan,blas   # some rows
#   scripts/backends-check.sh --markdown table.md  # also write the table
#
# Builds reuse ~/.cache/pylmserv-tests (PYLMSERV_HOME and ccache): a rerun is a cache hit and
# reports the cold build time the stamp recorded. Run scripts/setup-dev.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${PYLMSERV_TEST_CACHE:-$HOME/.cache/pylmserv-tests}"
mkdir -p "$cache"
for ver in 0.3.9 0.3.36; do  # the Vulkan row builds 0.3.9's llama.cpp and checks that 0.3.36's is refused
  [ -f "$cache/llama_cpp_python-$ver.tar.gz" ] || \
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$ver" -d "$cache"
done
# The CUDA row: a toolkit assembled from NVIDIA's PyPI wheels has no cuBLAS; its wheel matches nvcc's major.
if command -v nvcc >/dev/null; then
  release=$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')  # e.g. 13.0
  python3 - <<'PY' || python3 -m pip install -q "nvidia-cublas==${release}.*"
import sys
from pylmserv.builders.backends import cuda
sys.exit(0 if cuda.detect_cublas(cuda.detect_nvcc()).found else 1)
PY
fi
export PYLMSERV_TEST_JOBS="${PYLMSERV_TEST_JOBS:-2}"
exec nice python3 -m tests.support.backends_check "$@"
