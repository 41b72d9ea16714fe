"""ROCm/HIP (AMD): hipcc, the ROCm root and its clang and device libraries, the GPU agents
rocminfo lists, the HIP version against what the source needs; the preflight, the CMake
switches, the build environment and the doctor's lines for it."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from ...core.errors import ToolMissingError
from ..probe import (OK, PROBE_TIMEOUT, WARN, Check, Runner, Tool, default_run, probe_tool, toolkit_missing,
                     version_str, which)
from . import Switches, split_list

NAME = "rocm"
GPU_VENDOR = "amd"
DEFAULT_MIN_HIP = (6, 1)  # current llama.cpp (ggml/src/ggml-hip/CMakeLists.txt), used before the source is fetched


# -- detection -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RocmInfo:
    hipcc: Tool
    rocminfo: Tool
    rocm_path: Optional[str]  # ROCM_PATH/HIP_PATH or /opt/rocm when it exists
    hip_clang: Optional[str]  # $ROCM/llvm/bin/clang: what upstream sets HIPCXX to
    device_lib_path: Optional[str]  # amdgcn bitcode (HIP_DEVICE_LIB_PATH)
    gfx_targets: Tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return self.hipcc.found or self.hip_clang is not None


def detect_rocm(env=None, run: Runner = default_run) -> RocmInfo:
    env_ = env if env is not None else os.environ
    hipcc = probe_tool("hipcc", env=env, run=run)
    rocminfo = Tool("rocminfo", which("rocminfo", env))
    root = env_.get("ROCM_PATH") or env_.get("HIP_PATH")
    if not root and hipcc.found:
        root = str(Path(os.path.realpath(hipcc.path)).parent.parent)
    if not root and Path("/opt/rocm").exists():
        root = "/opt/rocm"
    clang = None
    dev_lib = env_.get("HIP_DEVICE_LIB_PATH")
    if root:
        cand = Path(root) / "llvm" / "bin" / "clang"
        clang = str(cand) if cand.exists() else None
        if not dev_lib:
            for sub in ("amdgcn/bitcode", "lib/llvm/lib/clang/amdgcn/bitcode", "llvm/lib/clang/amdgcn/bitcode"):
                if (Path(root) / sub).is_dir():
                    dev_lib = str(Path(root) / sub)
                    break
    gfx: Tuple[str, ...] = ()
    if rocminfo.found:
        rc, out = run([rocminfo.path], PROBE_TIMEOUT)
        if rc == 0:
            gfx = parse_rocminfo(out)
    return RocmInfo(hipcc, rocminfo, root, clang, dev_lib, gfx)


def parse_rocminfo(text: str) -> Tuple[str, ...]:
    """gfx targets of GPU agents in `rocminfo` output (CPU agents list no gfx name)."""
    seen: List[str] = []
    for m in re.finditer(r"^\s*Name:\s+(gfx[0-9a-f]+)\s*$", text, re.M):
        if m.group(1) not in seen and m.group(1) != "gfx000":
            seen.append(m.group(1))
    return tuple(seen)


def detect(env=None, run: Runner = default_run, platform: Optional[str] = None) -> dict:
    """What a ROCm build needs to know (Toolchain.extra)."""
    return {"rocm": detect_rocm(env, run)}


# -- what hipcc is, what the source needs ------------------------------------------------------

def hip_version(hipcc: Tool, run: Runner = default_run) -> Optional[Tuple[int, ...]]:
    """HIP version from `hipcc --version` ("HIP version: 5.2.21153-0"). Debian's hipcc also
    prints nvcc's banner when nvcc is installed: only the HIP line counts."""
    if not hipcc.found:
        return None
    rc, out = run([hipcc.path, "--version"], PROBE_TIMEOUT)
    m = re.search(r"HIP version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def required_hip_version(source: Path) -> Optional[Tuple[int, ...]]:
    """The minimum HIP version a llama.cpp tree's ggml-hip/CMakeLists.txt enforces
    (`if (${hip_VERSION} VERSION_LESS 6.1) message(FATAL_ERROR ...)`)."""
    for rel in ("ggml/src/ggml-hip/CMakeLists.txt", "ggml/src/ggml-cuda/CMakeLists.txt", "CMakeLists.txt"):
        try:
            text = (Path(source) / rel).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        m = re.search(r"hip_VERSION\}?\s+VERSION_LESS\s+\"?(\d+(?:\.\d+)*)", text)
        if m:
            return tuple(int(x) for x in m.group(1).split("."))
    return None


def hip_too_old(hipcc: Tool, found: Optional[Tuple[int, ...]], needed: Tuple[int, ...],
                needed_from: str) -> Optional[str]:
    """One line when the HIP toolkit is older than the source needs; None when it fits."""
    if found is None or tuple(found[:len(needed)]) >= tuple(needed):
        return None
    return (f"ROCm/HIP {version_str(found)} found ({hipcc.path}), but this llama.cpp needs HIP >= "
            f"{version_str(needed)} ({needed_from}); get ROCm {version_str(needed)}+ from AMD "
            "(https://rocm.docs.amd.com, amdgpu-install) or `nix develop .#rocm`, or use --backend vulkan")


# -- the build -----------------------------------------------------------------------------

def toolkit_found(extra: dict) -> bool:
    return extra["rocm"].found


def preflight(extra: dict, nix: str) -> List[str]:
    if not extra["rocm"].found:
        return [f"hipcc / ROCm (https://rocm.docs.amd.com, apt-get install rocm-hip-sdk; {nix})"]
    return []


def source_check(extra: dict, source: Optional[Path], cmake_args=()) -> None:
    """The HIP version the pinned tree requires (source None: not fetched yet, held to
    current llama.cpp's minimum). Raises ToolMissingError; doctor says the same."""
    rocm = extra["rocm"]
    needed = required_hip_version(source) if source is not None else DEFAULT_MIN_HIP
    where = "ggml/src/ggml-hip/CMakeLists.txt" if source is not None else "current llama.cpp"
    if needed and rocm.hipcc.found:
        problem = hip_too_old(rocm.hipcc, hip_version(rocm.hipcc), needed, where)
        if problem:
            raise ToolMissingError(f"cannot build llama.cpp (rocm): {problem}",
                                   hint="Install a newer ROCm and put its bin/ first on PATH (or set ROCM_PATH), "
                                        "then rerun; `pylmserv doctor --backend rocm` checks it.")


SWITCHES: Tuple[Tuple[str, str], ...] = ()  # GGML_HIP or {P}_HIPBLAS: which one the tree declares


def options(sw: Switches, req, det) -> None:
    """GGML_HIP (or the older {P}_HIPBLAS) and the GPU targets (--gpu-targets, else rocminfo)."""
    sw.set("GGML_HIP" if sw.has("GGML_HIP") else f"{sw.prefix}_HIPBLAS", "ON")
    targets = split_list(req.gpu_targets) or list(det.gfx_targets)
    if targets:
        var = "GPU_TARGETS" if sw.has("GPU_TARGETS") else "AMDGPU_TARGETS"
        sw.set(var, ";".join(targets))
        if not req.gpu_targets:
            sw.notes.append(f"GPU targets from rocminfo: {sw.defines[var]}")
    else:
        sw.notes.append("no --gpu-targets and rocminfo found no GPU: upstream's default target list")


def build_env(rocm: Optional[RocmInfo], base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment upstream documents for a HIP build: HIPCXX, HIP_PATH, HIP_DEVICE_LIB_PATH
    (each only when the user has not set it)."""
    base = base if base is not None else os.environ
    env: Dict[str, str] = {}
    if rocm is not None:
        if rocm.hip_clang and not base.get("HIPCXX"):
            env["HIPCXX"] = rocm.hip_clang
        if rocm.rocm_path and not base.get("HIP_PATH"):
            env["HIP_PATH"] = rocm.rocm_path
        if rocm.device_lib_path and not base.get("HIP_DEVICE_LIB_PATH"):
            env["HIP_DEVICE_LIB_PATH"] = rocm.device_lib_path
    return env


# -- doctor --------------------------------------------------------------------------------

def gpu_check(rocm: RocmInfo) -> Check:
    if rocm.rocminfo.found and rocm.gfx_targets:
        return Check("gpu-amd", OK, "ROCm agents: " + ", ".join(rocm.gfx_targets))
    if rocm.rocminfo.found:
        return Check("gpu-amd", WARN, "rocminfo found but lists no GPU agent",
                     "Check that the amdgpu driver is loaded and you are in the render and video groups.")
    return Check("gpu-amd", OK, "no AMD GPU seen by ROCm (rocminfo not found)")


def toolkit_check(rocm: RocmInfo, run: Runner = default_run, have_amd: bool = False,
                  requested: bool = False) -> Check:
    """The rocm-toolkit line: hipcc, its HIP version against current llama.cpp's minimum."""
    hipcc = rocm.hipcc
    if not hipcc.found:
        return toolkit_missing("rocm-toolkit", "AMD GPU found" if have_amd else "no AMD GPU found",
                               "no ROCm (hipcc not found)", "ROCm", requested,
                               "Install ROCm (https://rocm.docs.amd.com, `amdgpu-install --usecase=rocm`) or "
                               "`nix develop .#rocm`; without it use --backend vulkan.")
    targets = ", ".join(rocm.gfx_targets) or "no GPU agents detected"
    hip = hip_version(hipcc, run)
    detail = f"{hipcc.describe()}; HIP {version_str(hip)}; ROCm at {rocm.rocm_path}; targets {targets}"
    if hip is not None and tuple(hip[:2]) < DEFAULT_MIN_HIP:
        return Check("rocm-toolkit", WARN, detail + f" (current llama.cpp needs HIP >= {version_str(DEFAULT_MIN_HIP)})",
                     "Install ROCm >= 6.1 (https://rocm.docs.amd.com) or `nix develop .#rocm`.")
    return Check("rocm-toolkit", OK, detail)
