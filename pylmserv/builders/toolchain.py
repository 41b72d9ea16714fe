"""Detect the build toolchain of this machine: what every build needs (cmake, ninja, the
C/C++ compilers, ccache, OpenSSL headers) and which GPU vendors it has. Each backend's
own detection lives in its module (builders/backends/: cuda, rocm, vulkan, metal, blas);
`detect_toolchain` asks the one the build is for. Pure functions returning frozen
dataclasses, with `env`/`run` as in builders/probe.py; `pylmserv doctor` uses them too.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .backends import blas, cuda, metal, rocm, vulkan
from .probe import PROBE_TIMEOUT, Runner, Tool, default_run, probe_tool, which
# the stat-only detections of a build's key live in probes.py (the up-to-date path loads it alone)
from .probes import detect_openssl_headers, openssl_header_paths  # noqa: F401

# The backends with a module of their own (cpu needs nothing beyond the common tools).
BACKEND_MODULES = {m.NAME: m for m in (blas, cuda, rocm, vulkan, metal)}

MIN_CMAKE = (3, 18)  # ggml-cuda needs 3.18; llama.cpp itself 3.14
MIN_NINJA = (1, 10)


def _wheel_bin(module: str, attr: str) -> Optional[Path]:
    """The binary dir of the `cmake`/`ninja` PyPI wheels, when installed (the bootstrap)."""
    try:
        mod = __import__(module)
        return Path(getattr(mod, attr))
    except (ImportError, AttributeError, TypeError):
        return None


def detect_cmake(env=None, run: Runner = default_run, use_wheel: bool = True) -> Tool:
    """System cmake if new enough, else the `cmake` wheel from PyPI (pip install cmake)."""
    return _system_or_wheel("cmake", "cmake", "CMAKE_BIN_DIR", MIN_CMAKE, MIN_CMAKE, env, run, use_wheel)


def detect_ninja(env=None, run: Runner = default_run, use_wheel: bool = True) -> Tool:
    # Any ninja wheel will do: the wheels are all newer than MIN_NINJA.
    return _system_or_wheel("ninja", "ninja", "BIN_DIR", MIN_NINJA, (0,), env, run, use_wheel)


def _system_or_wheel(name: str, module: str, attr: str, minimum, wheel_minimum, env, run, use_wheel) -> Tool:
    tool = probe_tool(name, env=env, run=run)
    if tool.found and tool.version and tool.version >= minimum:
        return tool
    if use_wheel:
        bindir = _wheel_bin(module, attr)
        exe = bindir / (name + ".exe" if sys.platform == "win32" else name) if bindir else None
        if exe and exe.exists():
            wheel = probe_tool(name, env=env, run=run, exe=str(exe), origin="pip-wheel")
            if wheel.version and wheel.version >= wheel_minimum:
                return wheel
    return tool


def detect_compilers(env=None, run: Runner = default_run) -> Tuple[Tool, Tool]:
    """(C, C++) compilers: $CC/$CXX if set, else cc/gcc/clang and c++/g++/clang++."""
    env = env if env is not None else os.environ
    out = []
    for var, names in (("CC", ("cc", "gcc", "clang")), ("CXX", ("c++", "g++", "clang++"))):
        if env.get(var):
            exe = env[var].split()[0]
            path = (exe if os.access(exe, os.X_OK) else None) if os.path.isabs(exe) else which(exe, env)
            t = probe_tool(exe, env=env, run=run, exe=path, origin="env") if path else Tool(exe, origin="env")
            out.append(t)
            continue
        t = Tool(names[0])
        for n in names:
            t = probe_tool(n, env=env, run=run)
            if t.found:
                break
        out.append(t)
    return out[0], out[1]


def detect_ccache(env=None, run: Runner = default_run) -> Tool:
    tool = probe_tool("ccache", env=env, run=run)
    if tool.found:
        return tool
    return probe_tool("sccache", env=env, run=run)


PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x1022": "amd", "0x8086": "intel", "0x106b": "apple"}


def detect_gpu_vendors(env=None, run: Runner = default_run, sysfs: Path = Path("/sys/class/drm"),
                       platform: str = sys.platform) -> Tuple[str, ...]:
    """Which GPU vendors this machine has: nvidia-smi, rocminfo, then PCI display devices."""
    vendors: List[str] = []
    if cuda.detect_nvidia_gpus(env, run):
        vendors.append("nvidia")
    rocminfo = which("rocminfo", env)
    if rocminfo:
        rc, out = run([rocminfo], PROBE_TIMEOUT)
        if rc == 0 and rocm.parse_rocminfo(out):
            vendors.append("amd")
    try:
        cards = sorted(Path(sysfs).glob("card[0-9]*/device/vendor"))
    except OSError:
        cards = []
    for vendor_file in cards:
        try:
            v = PCI_VENDORS.get(vendor_file.read_text().strip().lower())
        except OSError:
            continue
        if v and v not in vendors:
            vendors.append(v)
    if platform == "darwin" and "apple" not in vendors:
        vendors.append("apple")
    return tuple(vendors)


@dataclass(frozen=True)
class Toolchain:
    """What one build needs to know about the machine, detected once."""

    cmake: Tool
    ninja: Tool
    cc: Tool
    cxx: Tool
    ccache: Tool
    extra: Dict[str, object] = field(default_factory=dict)  # backend-specific: nvcc, rocm, glslc, xcode, gpus

    def describe(self) -> List[str]:
        lines = [t.describe() for t in (self.cmake, self.ninja, self.cc, self.cxx, self.ccache)]
        for key, value in self.extra.items():
            if isinstance(value, Tool):
                lines.append(value.describe())
            elif isinstance(value, rocm.RocmInfo):
                lines.append(value.hipcc.describe())
                lines.append(f"rocm: {value.rocm_path or 'not found'}; gfx targets: {','.join(value.gfx_targets) or 'none detected'}")
            elif isinstance(value, (metal.Xcode, vulkan.VulkanSdk)):
                lines.append(value.describe())
            elif key == "nvidia_gpus":
                lines.append("nvidia gpus: " + (", ".join(f"{g.name} (sm_{g.arch})" for g in value) or "none detected"))
            elif key == "gpu_vendors":
                lines.append("gpu vendors: " + (", ".join(value) or "none detected"))
            else:
                lines.append(f"{key}: {value}")
        return lines


def detect_toolchain(backend: str, env=None, run: Runner = default_run, platform: str = sys.platform,
                     sysfs: Path = Path("/sys/class/drm")) -> Toolchain:
    cc, cxx = detect_compilers(env, run)
    module = BACKEND_MODULES.get(backend)
    extra: Dict[str, object] = dict(module.detect(env, run, platform)) if module is not None else {}
    if backend in ("cuda", "rocm", "vulkan"):
        extra["gpu_vendors"] = detect_gpu_vendors(env, run, sysfs, platform)
    return Toolchain(detect_cmake(env, run), detect_ninja(env, run), cc, cxx, detect_ccache(env, run), extra)


