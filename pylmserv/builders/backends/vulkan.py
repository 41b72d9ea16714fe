"""Vulkan: the devices vulkaninfo lists, the SDK packages ggml-vulkan needs (glslc, the C++
headers, SPIR-V headers, the loader, a driver), whether the headers are new enough for
the pinned source; the preflight, the CMake switch and the doctor's lines for it."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ...core.errors import ToolMissingError
from ..probe import FAIL, OK, PROBE_TIMEOUT, WARN, Check, Runner, Tool, default_run, probe_tool, version_str, which
from . import Switches

NAME = "vulkan"

VULKAN_WAYS_OUT = ("Install newer Vulkan headers (the LunarG Vulkan SDK, or libvulkan-dev from a newer distro), "
                   "use `nix develop .#vulkan`, or pin KhronosGroup/Vulkan-Headers as a source and pass "
                   "--cmake-arg -DVulkan_INCLUDE_DIR=<its include dir>; or build --backend cpu.")


# -- devices ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class VulkanDevice:
    name: str
    kind: str  # PHYSICAL_DEVICE_TYPE_DISCRETE_GPU | _INTEGRATED_GPU | _CPU | ...

    @property
    def software(self) -> bool:
        """A rasterizer running on the CPU (lavapipe/llvmpipe, SwiftShader): works, slowly."""
        return self.kind.endswith("_CPU") or bool(re.search(r"llvmpipe|lavapipe|swiftshader", self.name, re.I))


def parse_vulkaninfo_summary(text: str) -> Tuple[VulkanDevice, ...]:
    devices = []
    for block in re.split(r"\n(?=GPU\d+:)", text):
        name = re.search(r"deviceName\s*=\s*(.+)", block)
        kind = re.search(r"deviceType\s*=\s*(\S+)", block)
        if name:
            devices.append(VulkanDevice(name.group(1).strip(), kind.group(1) if kind else "?"))
    return tuple(devices)


def detect_vulkan_devices(env=None, run: Runner = default_run) -> Optional[Tuple[VulkanDevice, ...]]:
    """Devices from `vulkaninfo --summary`; None when vulkaninfo is missing or fails."""
    exe = which("vulkaninfo", env)
    if not exe:
        return None
    rc, out = run([exe, "--summary"], PROBE_TIMEOUT)
    return parse_vulkaninfo_summary(out) if rc == 0 else None


# -- the SDK ---------------------------------------------------------------------------------

def detect_glslc(env=None, run: Runner = default_run) -> Tool:
    return probe_tool("glslc", env=env, run=run)


def vulkan_include_dirs(env=None) -> List[Path]:
    env_ = env if env is not None else os.environ
    dirs = [Path(env_["VULKAN_SDK"]) / "include"] if env_.get("VULKAN_SDK") else []
    dirs += [Path(p) for p in env_.get("CPATH", "").split(os.pathsep) if p]
    return dirs + [Path("/usr/local/include"), Path("/usr/include")]


@dataclass(frozen=True)
class VulkanSdk:
    """What building ggml-vulkan needs, each with the Debian package that provides it."""

    glslc: Tool
    headers: Optional[str]  # include dir holding vulkan/vulkan.hpp
    header_version: Optional[Tuple[int, ...]]  # 1.3.239
    spirv_headers: bool
    loader: Optional[str]  # libvulkan.so (the link-time loader)
    icds: Tuple[str, ...]  # installable client drivers (/usr/share/vulkan/icd.d/*.json)

    def missing(self) -> List[str]:
        out = []
        if not self.glslc.found:
            out.append("glslc (apt-get install glslc)")
        if not self.headers:
            out.append("Vulkan C++ headers vulkan/vulkan.hpp (apt-get install libvulkan-dev)")
        if not self.spirv_headers:
            out.append("SPIR-V headers (apt-get install spirv-headers)")
        if not self.loader:
            out.append("the Vulkan loader libvulkan.so (apt-get install libvulkan-dev)")
        return out

    def describe(self) -> str:
        return (f"vulkan headers: {self.headers or 'not found'} ({version_str(self.header_version)}); "
                f"spirv-headers: {'yes' if self.spirv_headers else 'no'}; loader: {self.loader or 'not found'}")


def detect_vulkan_sdk(env=None, run: Runner = default_run, include_dirs: Optional[Sequence[Path]] = None,
                      lib_dirs: Optional[Sequence[Path]] = None,
                      icd_dirs: Sequence[Path] = (Path("/usr/share/vulkan/icd.d"), Path("/etc/vulkan/icd.d"))) -> VulkanSdk:
    env_ = env if env is not None else os.environ
    incs = list(include_dirs) if include_dirs is not None else vulkan_include_dirs(env)
    headers = next((str(d) for d in incs if (d / "vulkan" / "vulkan.hpp").is_file()), None)
    version = None
    if headers:
        try:
            core = (Path(headers) / "vulkan" / "vulkan_core.h").read_text(errors="replace")
            patch = re.search(r"#define VK_HEADER_VERSION (\d+)", core)
            major_minor = re.search(r"VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(0, (\d+), (\d+)", core)
            if patch and major_minor:
                version = (int(major_minor.group(1)), int(major_minor.group(2)), int(patch.group(1)))
        except OSError:
            pass
    spirv = any((d / "spirv" / "unified1" / "spirv.hpp").is_file() for d in incs)
    libs = list(lib_dirs) if lib_dirs is not None else (
        ([Path(env_["VULKAN_SDK"]) / "lib"] if env_.get("VULKAN_SDK") else [])
        + [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"), Path("/usr/lib64"),
           Path("/usr/lib"), Path("/usr/local/lib")])
    loader = next((str(d / "libvulkan.so") for d in libs if (d / "libvulkan.so").exists()), None)
    icds = tuple(sorted(str(p) for d in icd_dirs if Path(d).is_dir() for p in Path(d).glob("*.json")))
    return VulkanSdk(detect_glslc(env, run), headers, version, spirv, loader, icds)


def detect(env=None, run: Runner = default_run, platform: Optional[str] = None) -> dict:
    """What a Vulkan build needs to know (Toolchain.extra)."""
    return {"glslc": detect_glslc(env, run), "vulkan_sdk": detect_vulkan_sdk(env, run)}


# -- whether the headers are new enough for the source -----------------------------------------

def vulkan_names_used(source: Path) -> Dict[str, str]:
    """`vk::` names ggml-vulkan uses unconditionally: name -> first "file:line". Uses inside
    #if blocks are left out (the source guards newer extensions with VK_* macros)."""
    used: Dict[str, str] = {}
    root = Path(source)
    files = sorted((root / "ggml" / "src" / "ggml-vulkan").glob("*.cpp")) or sorted(root.glob("ggml-vulkan*.cpp"))
    for path in files:
        depth = 0
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            s = line.strip()
            if re.match(r"#\s*if", s):
                depth += 1
            elif re.match(r"#\s*endif", s):
                depth = max(0, depth - 1)
            elif depth == 0:
                for name in re.findall(r"\bvk::(\w+)", line):
                    used.setdefault(name, f"{path.relative_to(root)}:{i}")
    return used


def vulkan_header_gaps(source: Path, headers: str) -> Dict[str, str]:
    """The vk:: names the source uses that the installed C++ headers do not declare."""
    declared = set()
    for hpp in Path(headers, "vulkan").glob("*.hpp"):
        declared.update(re.findall(r"\b[A-Za-z_]\w*\b", hpp.read_text(encoding="utf-8", errors="replace")))
    return {n: where for n, where in vulkan_names_used(source).items() if n not in declared}


def vulkan_headers_too_old(source: Path, sdk: VulkanSdk) -> Optional[str]:
    """One line when the installed Vulkan headers lack names the source uses; None when they fit."""
    if not sdk.headers:
        return None
    gaps = vulkan_header_gaps(source, sdk.headers)
    if not gaps:
        return None
    names = sorted(gaps)
    shown = ", ".join(f"vk::{n}" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"Vulkan headers {version_str(sdk.header_version)} in {sdk.headers} are too old for this llama.cpp: "
            f"they lack {shown} (used at {gaps[names[0]]})")


# -- the build -----------------------------------------------------------------------------

def toolkit_found(extra: dict) -> bool:
    sdk = extra.get("vulkan_sdk")
    return not sdk.missing() if sdk is not None else extra["glslc"].found


def preflight(extra: dict, nix: str) -> List[str]:
    sdk = extra.get("vulkan_sdk")
    if sdk is not None:
        return [f"{m} (or the LunarG Vulkan SDK; {nix})" for m in sdk.missing()]
    if not extra["glslc"].found:
        return [f"glslc, the Vulkan shader compiler (apt-get install glslc libvulkan-dev, "
                f"or the LunarG Vulkan SDK; {nix})"]
    return []


def source_check(extra: dict, source: Optional[Path], cmake_args: Sequence[str] = ()) -> None:
    """The vk:: names the pinned ggml-vulkan uses, against the headers CMake will see (the
    ones the user points it at with -DVulkan_INCLUDE_DIR, else the installed ones)."""
    if source is None:
        return
    sdk = extra.get("vulkan_sdk") or detect_vulkan_sdk()
    for arg in cmake_args:  # headers the user points CMake at (e.g. a pinned Vulkan-Headers tree)
        m = re.match(r"(?:-D)?Vulkan_INCLUDE_DIR(?::\w+)?=(.+)", arg)
        if m:
            sdk = detect_vulkan_sdk(include_dirs=[Path(m.group(1))])
    problem = vulkan_headers_too_old(source, sdk)
    if problem:
        raise ToolMissingError(f"cannot build llama.cpp (vulkan): {problem}", hint=VULKAN_WAYS_OUT)


SWITCHES = (("{P}_VULKAN", "ON"),)


def options(sw: Switches, req, det) -> None:
    sw.table(SWITCHES)


# -- doctor --------------------------------------------------------------------------------

def gpu_check(env=None, run: Runner = default_run, requested: bool = False
              ) -> Tuple[Check, Optional[Tuple[VulkanDevice, ...]]]:
    """(the gpu-vulkan line, the devices or None when vulkaninfo cannot say)."""
    if not which("vulkaninfo", env):
        return (Check("gpu-vulkan", WARN if requested else OK, "vulkaninfo not found (only needed for --backend vulkan)",
                      "apt-get install vulkan-tools (to list Vulkan devices)" if requested else ""), None)
    devices = detect_vulkan_devices(env, run)
    if devices is None:
        return (Check("gpu-vulkan", WARN, "vulkaninfo --summary failed (no Vulkan driver?)",
                      "Install your GPU's Vulkan driver (Mesa: apt-get install mesa-vulkan-drivers)."), None)
    if devices and all(d.software for d in devices):
        return (Check("gpu-vulkan", WARN, "devices: " + ", ".join(d.name for d in devices)
                      + " - a software rasterizer only (runs on the CPU: works, slowly)",
                      "For speed install your GPU's Vulkan driver; on this machine --backend cpu/blas is faster."),
                devices)
    return Check("gpu-vulkan", OK, "devices: " + (", ".join(d.name for d in devices) or "none")), devices


def toolkit_check(env=None, run: Runner = default_run, requested: bool = False) -> Check:
    """Each package ggml-vulkan needs, by name (glslc, headers, spirv-headers, loader, ICD)."""
    sdk = detect_vulkan_sdk(env, run)
    missing = sdk.missing()
    if not sdk.icds:
        missing.append("a Vulkan driver (ICD) (apt-get install mesa-vulkan-drivers, or your GPU vendor's driver)")
    if missing:
        return Check("vulkan-toolkit", FAIL if requested else WARN, "missing " + "; ".join(missing),
                     "Install the packages named, or the LunarG Vulkan SDK, or `nix develop .#vulkan`.")
    return Check("vulkan-toolkit", OK, f"{sdk.glslc.describe()}; headers {version_str(sdk.header_version)} in "
                 f"{sdk.headers}; loader {sdk.loader}; {len(sdk.icds)} ICD(s)")
