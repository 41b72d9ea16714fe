"""The CMake switches exist twice: the Python builder's option mapping
(pylmserv.builders.llama_cpp.map_options) and nix/llama-cpp.nix. This compares them per
backend, so the two cannot drift apart unnoticed.

nix/llama-cpp.nix is evaluated against the nixpkgs stand-in (tests/nixpkgs-standin: no
nixpkgs here) by real Nix, exactly as test_flake_standin_eval does; the Python side maps a
portable request (Nix builds are portable) on the locked source's switches. Where the two
differ on purpose, KNOWN says why; anything else fails here.
"""
from __future__ import annotations

import pytest

from pylmserv.builders.llama_cpp import Detected, Request, builtin_features, map_options
from tests.test_flake_standin_eval import nix_module, packages, real_lock, repo_flake  # noqa: F401 (fixtures)

pytestmark = pytest.mark.nix

COMPARED = ("GGML_BLAS", "GGML_CUDA", "GGML_HIP", "GGML_VULKAN", "GGML_METAL", "GGML_NATIVE", "GGML_BACKEND_DL",
            "GGML_CPU_ALL_VARIANTS", "BUILD_SHARED_LIBS", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_EXAMPLES",
            "LLAMA_BUILD_SERVER", "LLAMA_BUILD_UI", "LLAMA_USE_PREBUILT_UI", "GGML_METAL_EMBED_LIBRARY",
            "CMAKE_CUDA_ARCHITECTURES", "gpu targets")

# (nix variant, switch) -> why the two builds differ on purpose.
KNOWN = {
    ("metal", "GGML_BACKEND_DL"): "Nix loads backends from $out/lib on macOS too; pylmserv's portable macOS build "
                                  "stays one static binary (no CPU variants to choose from on Apple silicon)",
    ("metal", "BUILD_SHARED_LIBS"): "follows GGML_BACKEND_DL (it requires shared libraries)",
}

# nix variant -> (attribute in the evaluated packages, the Python request, the machine)
VARIANTS = {
    "cpu": ("llama", "cpu", Request(backend="blas", portable=True), Detected(platform="linux")),
    "cuda": ("cudaOverride", None, Request(backend="cuda", portable=True, cuda_arch="8.6,8.9"),
             Detected(platform="linux")),
    "rocm": ("rocmOverride", None, Request(backend="rocm", portable=True, gpu_targets="gfx1100"),
             Detected(platform="linux")),
    "vulkan": ("llama", "vulkan", Request(backend="vulkan", portable=True), Detected(platform="linux")),
    "metal": ("llama", "metal", Request(backend="metal", portable=True), Detected(platform="darwin")),
}


def nix_switches(flags) -> dict:
    out = {}
    for f in flags:
        name, value = f[2:].split("=", 1)
        name = name.split(":", 1)[0]
        out[name] = {"TRUE": "ON", "FALSE": "OFF"}.get(value, value)
    if "CMAKE_HIP_ARCHITECTURES" in out:
        out["gpu targets"] = out["CMAKE_HIP_ARCHITECTURES"]
    return out


def python_switches(req, det, rev) -> dict:
    d = dict(map_options(req, builtin_features(rev), det, rev).defines)
    for backend_switch in ("GGML_BLAS", "GGML_CUDA", "GGML_HIP", "GGML_VULKAN", "GGML_METAL"):
        d.setdefault(backend_switch, "OFF")  # the mapping only names the backend it turns on
    for switch in ("GGML_BACKEND_DL", "GGML_CPU_ALL_VARIANTS"):
        d.setdefault(switch, "OFF")
    if "GPU_TARGETS" in d or "AMDGPU_TARGETS" in d:
        d["gpu targets"] = d.get("GPU_TARGETS") or d.get("AMDGPU_TARGETS")
    return d


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_python_mapping_and_nix_agree(packages, real_lock, variant):  # noqa: F811
    attr, key, req, det = VARIANTS[variant]
    flags = packages[attr][key]["flags"] if key else packages[attr]
    nix = nix_switches(flags)
    py = python_switches(req, det, real_lock["sources"]["llama-cpp"]["rev"])
    diffs = {}
    for name in COMPARED:
        if name not in nix and name not in py:
            continue
        if name in ("CMAKE_CUDA_ARCHITECTURES", "gpu targets", "GGML_METAL_EMBED_LIBRARY") and (name not in nix
                                                                                              or name not in py):
            diffs[name] = (nix.get(name), py.get(name))
            continue
        if nix.get(name, "OFF") != py.get(name, "OFF"):
            diffs[name] = (nix.get(name), py.get(name))
    unexplained = {k: v for k, v in diffs.items() if (variant, k) not in KNOWN}
    assert unexplained == {}, f"nix/llama-cpp.nix vs map_options ({variant}): (nix, python) = {unexplained}"
    # every KNOWN difference still exists (else the note is stale)
    stale = [k for (v, k) in KNOWN if v == variant and k not in diffs]
    assert stale == [], f"KNOWN lists differences that are gone: {stale}"
