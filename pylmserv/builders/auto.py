"""`--backend auto`: the backend this machine can build and run best, decided from the
same detections doctor shows (builders/backends/ and builders/toolchain.py)."""
from __future__ import annotations

import platform as _pf
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .backends.blas import detect_blas
from .backends.cuda import detect_cublas, detect_nvcc, detect_nvidia_gpus
from .backends.rocm import DEFAULT_MIN_HIP, detect_rocm, hip_version
from .backends.vulkan import VulkanSdk, detect_vulkan_devices, detect_vulkan_sdk
from .probe import Runner, default_run, version_str
from .toolchain import detect_gpu_vendors

@dataclass(frozen=True)
class BackendChoice:
    backend: str
    reason: str  # one line: why this backend
    passed_over: Tuple[str, ...] = ()  # why the better ones were not taken

    def describe(self) -> str:
        tail = f" (not taken: {'; '.join(self.passed_over)})" if self.passed_over else ""
        return f"--backend auto chose {self.backend}: {self.reason}{tail}"


def choose_backend(engine: str = "llama.cpp", env=None, run: Runner = default_run, platform: str = sys.platform,
                   machine: Optional[str] = None, sysfs: Path = Path("/sys/class/drm"),
                   min_hip: Tuple[int, ...] = DEFAULT_MIN_HIP, vulkan_sdk: Optional[VulkanSdk] = None,
                   cublas_wheel_dirs: Optional[Sequence[Path]] = None) -> BackendChoice:
    """The backend this machine can build and run best, as doctor sees it: an NVIDIA GPU
    with a usable CUDA toolkit -> cuda; an AMD GPU with ROCm >= `min_hip` -> rocm; a
    hardware Vulkan device with the SDK -> vulkan (llama.cpp); Apple silicon -> metal
    (llama.cpp); else cpu, or blas when OpenBLAS is there (llama.cpp). The toolkit of a
    vendor is only probed when that vendor's GPU is present: no nvcc on an AMD machine."""
    machine = machine or _pf.machine()
    llama = engine == "llama.cpp"
    if platform == "darwin":
        if llama and machine in ("arm64", "aarch64"):
            return BackendChoice("metal", "Apple silicon")
        return BackendChoice("cpu", "macOS" + (": llamafile uses Metal at run time by itself" if not llama else
                                              " on Intel: no Metal backend worth building"))
    passed: List[str] = []
    vendors = detect_gpu_vendors(env, run, sysfs, platform)
    if "nvidia" in vendors:
        gpus = detect_nvidia_gpus(env, run)
        names = ", ".join(f"{g.name} (sm_{g.arch})" for g in gpus) or "NVIDIA GPU (PCI)"
        nvcc = detect_nvcc(env, run)
        if not nvcc.found:
            passed.append(f"cuda: {names} but no CUDA toolkit (nvcc)")
        else:
            cublas = detect_cublas(nvcc, env, wheel_dirs=cublas_wheel_dirs) if llama else None
            if cublas is not None and not cublas.found:
                passed.append(f"cuda: {names}, nvcc {version_str(nvcc.version)} but no cuBLAS "
                              "(pip install nvidia-cublas, or the toolkit's libcublas-dev)")
            else:
                return BackendChoice("cuda", f"{names}; nvcc {version_str(nvcc.version)} at {nvcc.path}"
                                     + (f"; cuBLAS at {cublas.path}" if cublas is not None else ""), tuple(passed))
    if "amd" in vendors:
        rocm = detect_rocm(env, run)
        targets = ", ".join(rocm.gfx_targets) or "AMD GPU (PCI)"
        found = hip_version(rocm.hipcc, run)
        if not rocm.hipcc.found:
            passed.append(f"rocm: {targets} but no ROCm (hipcc)")
        elif found is None or tuple(found[:len(min_hip)]) < tuple(min_hip):
            passed.append(f"rocm: {targets} but HIP {version_str(found)} < {version_str(min_hip)} needed")
        else:
            return BackendChoice("rocm", f"{targets}; HIP {version_str(found)} at {rocm.hipcc.path}", tuple(passed))
    if llama:
        devices = detect_vulkan_devices(env, run)
        if devices:
            hardware = [d for d in devices if not d.software]
            if not hardware:
                passed.append("vulkan: only a software rasterizer (" + ", ".join(d.name for d in devices)
                              + "): slower than the CPU backend")
            else:
                sdk = vulkan_sdk or detect_vulkan_sdk(env, run)
                if sdk.missing():
                    passed.append(f"vulkan: {hardware[0].name} but missing " + ", ".join(sdk.missing()))
                else:
                    return BackendChoice("vulkan", f"Vulkan device {hardware[0].name}; glslc and headers "
                                         f"{version_str(sdk.header_version)} installed", tuple(passed))
        blas = detect_blas(platform)
        if blas:
            return BackendChoice("blas", f"no usable GPU; {blas} found", tuple(passed))
        return BackendChoice("cpu", "no usable GPU and no OpenBLAS (apt-get install libopenblas-dev for blas)",
                             tuple(passed))
    return BackendChoice("cpu", "no usable GPU", tuple(passed))


