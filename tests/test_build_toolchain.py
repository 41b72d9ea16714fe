"""Toolchain and GPU detection against stand-in tools on PATH.

No GPU here: nvidia-smi, rocminfo, nvcc and hipcc are stand-in scripts (named so) that
print what the real tools print; detection runs them for real through PATH."""
from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from tests.support.tools import require_module

from pylmserv.builders.backends import cuda, rocm
from pylmserv.builders import toolchain as tc
from pylmserv.builders.llama_cpp import preflight
from pylmserv.core.errors import ToolMissingError

NVIDIA_SMI_OUT = "NVIDIA GeForce RTX 3090, 8.6\nNVIDIA H100 80GB HBM3, 9.0\n"
NVCC_OUT = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2024 NVIDIA Corporation
Built on Thu_Jun__6_02:18:23_PDT_2024
Cuda compilation tools, release 12.5, V12.5.82
Build cuda_12.5.r12.5/compiler.34385749_0
"""
ROCMINFO_OUT = """ROCk module version 6.8.5 is loaded
=====================
HSA System Attributes
=====================
Runtime Version:         1.14
==========
HSA Agents
==========
*******
Agent 1
*******
  Name:                    AMD Ryzen 9 7950X 16-Core Processor
  Uuid:                    CPU-XX
  Marketing Name:          AMD Ryzen 9 7950X 16-Core Processor
  Vendor Name:             CPU
  Device Type:             CPU
*******
Agent 2
*******
  Name:                    gfx1100
  Uuid:                    GPU-5f2b2a0f1c3d4e5f
  Marketing Name:          Radeon RX 7900 XTX
  Vendor Name:             AMD
  Device Type:             GPU
  ISA Info:
    ISA 1
      Name:                    amdgcn-amd-amdhsa--gfx1100
*******
Agent 3
*******
  Name:                    gfx90a
  Marketing Name:          AMD Instinct MI210
  Vendor Name:             AMD
  Device Type:             GPU
*** Done ***
"""


def standin(bindir: Path, name: str, output: str, rc: int = 0) -> Path:
    """A stand-in executable that prints `output` like the real tool."""
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / name
    body = output.replace("'", "'\\''")
    path.write_text(f"#!/bin/sh\nprintf '%s' '{body}'\nexit {rc}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def bindir(tmp_path):
    return tmp_path / "bin"


def env_for(bindir: Path) -> dict:
    return {"PATH": str(bindir)}


def test_nvidia_smi_standin_compute_caps(bindir):
    standin(bindir, "nvidia-smi", NVIDIA_SMI_OUT)
    gpus = cuda.detect_nvidia_gpus(env_for(bindir))
    assert [(g.name, g.compute_cap, g.arch) for g in gpus] == [
        ("NVIDIA GeForce RTX 3090", "8.6", "86"), ("NVIDIA H100 80GB HBM3", "9.0", "90")]


def test_nvidia_smi_standin_failing_means_no_gpus(bindir):
    standin(bindir, "nvidia-smi", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", rc=9)
    assert cuda.detect_nvidia_gpus(env_for(bindir)) == ()


def test_rocminfo_standin_gfx_targets(bindir):
    standin(bindir, "rocminfo", ROCMINFO_OUT)
    standin(bindir, "hipcc", "HIP version: 6.2.41133-dd7f95766\nAMD clang version 18.0.0git\n")
    info = rocm.detect_rocm(env_for(bindir))
    assert info.gfx_targets == ("gfx1100", "gfx90a")
    assert info.hipcc.found and info.hipcc.version == (6, 2, 41133)


def test_nvcc_standin_release_version(bindir):
    standin(bindir, "nvcc", NVCC_OUT)
    nvcc = cuda.detect_nvcc(env_for(bindir))
    assert nvcc.found and nvcc.version == (12, 5)


def test_cmake_too_old_falls_back_to_the_pypi_wheel(bindir):
    standin(bindir, "cmake", "cmake version 3.10.2\n\nCMake suite maintained and supported by Kitware.\n")
    cmake = tc.detect_cmake(env_for(bindir))
    require_module("cmake")  # the [test] extra installs the wheel
    assert cmake.origin == "pip-wheel" and cmake.version >= tc.MIN_CMAKE
    assert tc.detect_cmake(env_for(bindir), use_wheel=False).version == (3, 10, 2)


def test_missing_cmake_without_wheel(bindir):
    bindir.mkdir()
    assert not tc.detect_cmake(env_for(bindir), use_wheel=False).found


def test_compilers_from_env(bindir):
    standin(bindir, "my-gcc", "my-gcc (Debian 12.2.0-14) 12.2.0\n")
    cc, cxx = tc.detect_compilers({"PATH": str(bindir), "CC": "my-gcc", "CXX": str(bindir / "missing-g++")})
    assert cc.found and cc.version == (12, 2, 0) and cc.origin == "env"
    assert not cxx.found


def test_gpu_vendors_from_sysfs(tmp_path, bindir):
    bindir.mkdir()
    for card, vendor in (("card0", "0x1002"), ("card1", "0x8086")):
        d = tmp_path / "drm" / card / "device"
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
    assert tc.detect_gpu_vendors(env_for(bindir), sysfs=tmp_path / "drm", platform="linux") == ("amd", "intel")


def _toolchain(bindir, backend, sysfs, **standins):
    for name, out in standins.items():
        standin(bindir, name.replace("_", "-"), out)
    bindir.mkdir(exist_ok=True)
    return tc.detect_toolchain(backend, env=env_for(bindir), sysfs=sysfs, platform="linux")


def base_tools(bindir):
    standin(bindir, "cmake", "cmake version 3.28.3\n")
    standin(bindir, "ninja", "1.11.1\n")
    standin(bindir, "cc", "cc (Debian 12.2.0-14) 12.2.0\n")
    standin(bindir, "c++", "c++ (Debian 12.2.0-14) 12.2.0\n")


def test_preflight_cuda_on_an_amd_machine_says_so(bindir, tmp_path):
    """The seed's story: asked for CUDA, no nvcc, and the GPU is AMD."""
    base_tools(bindir)
    standin(bindir, "rocminfo", ROCMINFO_OUT)
    env = env_for(bindir)
    # nvcc deliberately absent (this machine may have /usr/local/cuda: not consulted here)
    t = tc.Toolchain(tc.detect_cmake(env), tc.detect_ninja(env), *tc.detect_compilers(env), tc.Tool("ccache"),
                     {"nvcc": tc.Tool("nvcc"),
                      "gpu_vendors": tc.detect_gpu_vendors(env, sysfs=tmp_path / "nodrm", platform="linux")})
    with pytest.raises(ToolMissingError) as err:
        preflight("cuda", t, platform="linux")
    msg = err.value.message
    assert "nvcc" in msg and "nix develop .#cuda" in msg
    assert "this machine's GPU is AMD" in msg and "--backend rocm" in msg
    assert err.value.exit_code == 5


def test_preflight_rocm_on_an_nvidia_machine(bindir, tmp_path):
    base_tools(bindir)
    t = _toolchain(bindir, "rocm", tmp_path / "nodrm", nvidia_smi=NVIDIA_SMI_OUT)
    with pytest.raises(ToolMissingError) as err:
        preflight("rocm", t, platform="linux")
    assert "hipcc" in err.value.message and "GPU is NVIDIA" in err.value.message and "--backend cuda" in err.value.message


def test_preflight_cuda_toolkit_present_but_amd_gpu_is_a_warning(bindir, tmp_path):
    base_tools(bindir)
    t = _toolchain(bindir, "cuda", tmp_path / "nodrm", rocminfo=ROCMINFO_OUT, nvcc=NVCC_OUT)
    lib = tmp_path / "cuda" / "lib64" / "libcublas.so"  # a complete toolkit: cuBLAS present
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    t = dataclasses.replace(t, extra={**t.extra, "cublas": cuda.detect_cublas(t.extra["nvcc"], roots=[lib.parent.parent])})
    warnings = preflight("cuda", t, platform="linux")
    assert any("GPU is AMD" in w for w in warnings)


def test_preflight_names_every_missing_tool(bindir, tmp_path):
    bindir.mkdir()
    t = tc.Toolchain(tc.Tool("cmake"), tc.Tool("ninja"), tc.Tool("cc"), tc.Tool("c++"), tc.Tool("ccache"),
                     {"glslc": tc.Tool("glslc")})
    with pytest.raises(ToolMissingError) as err:
        preflight("vulkan", t, platform="linux")
    msg = err.value.message
    for word in ("cmake >= 3.18", "pip install cmake ninja", "a C compiler", "a C++ compiler", "glslc",
                 "nix develop .#vulkan"):
        assert word in msg, word


def test_preflight_ok_with_standins_and_ninja_warning(bindir, tmp_path):
    standin(bindir, "cmake", "cmake version 3.28.3\n")
    standin(bindir, "cc", "cc 12\n")
    standin(bindir, "c++", "c++ 12\n")
    t = tc.Toolchain(tc.detect_cmake(env_for(bindir), use_wheel=False), tc.Tool("ninja"),
                     *tc.detect_compilers(env_for(bindir)), tc.Tool("ccache"), {})
    assert any("ninja not found" in w for w in preflight("cpu", t, platform="linux"))


def test_cublas_found_or_missing_in_a_toolkit_tree(tmp_path):
    """A toolkit with nvcc but no cuBLAS fails at CMake configure (seen on this machine's
    pip-installed CUDA 13): detection finds the library or reports it missing."""
    root = tmp_path / "cuda"
    nvcc = standin(root / "bin", "nvcc", NVCC_OUT)
    (root / "targets" / "x86_64-linux" / "lib").mkdir(parents=True)
    tool = tc.Tool("nvcc", str(nvcc), (12, 5))
    assert not cuda.detect_cublas(tool, roots=[root]).found
    lib = root / "targets" / "x86_64-linux" / "lib" / "libcublas.so"
    lib.write_bytes(b"")
    assert cuda.detect_cublas(tool, roots=[root]).path == str(lib)
    assert cuda.cuda_roots(tool, env={"CUDA_PATH": str(root)})[0] == root


def test_preflight_cuda_without_cublas(bindir):
    base_tools(bindir)
    env = env_for(bindir)
    t = tc.Toolchain(tc.detect_cmake(env), tc.detect_ninja(env), *tc.detect_compilers(env), tc.Tool("ccache"),
                     {"nvcc": tc.Tool("nvcc", "/opt/cuda/bin/nvcc", (13, 0)), "cublas": tc.Tool("cublas")})
    with pytest.raises(ToolMissingError, match="cuBLAS"):
        preflight("cuda", t, platform="linux")
