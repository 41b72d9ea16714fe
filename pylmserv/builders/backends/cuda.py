"""CUDA (NVIDIA): nvcc, the toolkit's roots and cuBLAS (a toolkit or NVIDIA's PyPI wheels),
the driver stub, the GPUs nvidia-smi lists; the preflight, the CMake switches and the
doctor's lines for it."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..probe import (OK, PROBE_TIMEOUT, WARN, Check, Library, Runner, Tool, default_run, python_lib_dirs,
                     toolkit_missing, version_str, which)
from . import Switches, split_list

NAME = "cuda"
GPU_VENDOR = "nvidia"
# llama.cpp's own non-native CUDA architecture list (ggml/src/ggml-cuda/CMakeLists.txt, 2025-26).
UPSTREAM_CUDA_ARCHS = ("50-virtual", "61-virtual", "70-virtual", "75-virtual", "80-virtual", "86-real", "89-real",
                       "90-virtual", "120a-real")


# -- detection -----------------------------------------------------------------------------

def detect_nvcc(env=None, run: Runner = default_run) -> Tool:
    """nvcc on PATH, else under $CUDA_PATH/$CUDA_HOME or /usr/local/cuda; version from "release X.Y"."""
    env_ = env if env is not None else os.environ
    exe = which("nvcc", env)
    origin = "system"
    if not exe:
        for root in (env_.get("CUDA_PATH"), env_.get("CUDA_HOME"), "/usr/local/cuda"):
            if root and (Path(root) / "bin" / "nvcc").exists():
                exe, origin = str(Path(root) / "bin" / "nvcc"), "env"
                break
    if not exe:
        return Tool("nvcc")
    rc, out = run([exe, "--version"], PROBE_TIMEOUT)
    m = re.search(r"release (\d+)\.(\d+)", out)
    version = (int(m.group(1)), int(m.group(2))) if m and rc == 0 else None
    return Tool("nvcc", exe, version, origin, out.strip().splitlines()[-1] if out.strip() else "")


def nvcc_arches(nvcc: Optional[str], run: Runner = default_run) -> Optional[Tuple[str, ...]]:
    """The compute capabilities this nvcc can target (`nvcc --list-gpu-arch`, CUDA >= 11),
    numerically sorted ("75", "80", ...); None when it cannot say."""
    if not nvcc:
        return None
    rc, out = run([nvcc, "--list-gpu-arch"], PROBE_TIMEOUT)
    if rc != 0:
        return None
    return tuple(sorted(set(re.findall(r"compute_(\d+)", out)), key=int))


def cuda_roots(nvcc: Tool, env=None) -> List[Path]:
    """Where a CUDA toolkit may live, most specific first (nvcc may be a wrapper script)."""
    env_ = env if env is not None else os.environ
    roots: List[Path] = []
    for r in (env_.get("CUDA_PATH"), env_.get("CUDA_HOME")):
        if r:
            roots.append(Path(r))
    if nvcc.path:
        roots.append(Path(os.path.realpath(nvcc.path)).parent.parent)
    roots += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True), Path("/opt/cuda"),
              Path("/usr")]
    return list(dict.fromkeys(roots))


def detect_cublas(nvcc: Tool, env=None, roots: Optional[Sequence[Path]] = None,
                  wheel_dirs: Optional[Sequence[Path]] = None) -> Library:
    """cuBLAS, which ggml-cuda links, in either layout: a CUDA toolkit (lib64/libcublas.so,
    what NVIDIA's installers and distros ship) or NVIDIA's PyPI wheel beside a toolkit
    assembled from wheels (site-packages/nvidia/cu13/lib/libcublas.so.13, or
    nvidia/cublas/lib for CUDA 12). A wheel for another CUDA major than nvcc's is skipped."""
    names = ("libcublas.so", "libcublas_static.a", "cublas.lib")
    for root in (roots if roots is not None else cuda_roots(nvcc, env)):
        libdirs = [root / "lib64", root / "lib", root / "lib" / "x64", *sorted(root.glob("targets/*/lib")),
                   *sorted(root.glob("lib/*-linux-gnu"))]
        for d in libdirs:
            for n in names:
                if (d / n).exists():
                    return Library("cublas", str(d / n), origin="toolkit")
    major = str(nvcc.version[0]) if nvcc.version else None
    for site_dir in (wheel_dirs if wheel_dirs is not None else python_lib_dirs()):
        for lib in sorted(site_dir.glob("nvidia/*/lib/libcublas.so*")):
            suffix = lib.name[len("libcublas.so"):].lstrip(".")
            if major and suffix and suffix.split(".")[0] != major:
                continue
            include = lib.parent.parent / "include"
            return Library("cublas", str(lib), origin="pip-wheel",
                           include=str(include) if (include / "cublas_v2.h").exists() else None)
    return Library("cublas")


def find_cuda_stubs(nvcc: Tool, env=None, roots: Optional[Sequence[Path]] = None) -> Optional[Path]:
    """The toolkit's stubs/ directory with the driver stub libcuda.so (for linking only:
    at run time the driver's libcuda.so.1 is used). Toolkits assembled from NVIDIA's PyPI
    wheels have none."""
    for root in (roots if roots is not None else cuda_roots(nvcc, env)):
        for d in (root / "lib64" / "stubs", root / "lib" / "stubs", *sorted(root.glob("targets/*/lib/stubs"))):
            if (d / "libcuda.so").exists():
                return d
    return None


def find_cuda_header(nvcc: Tool, env=None) -> Optional[Path]:
    for root in cuda_roots(nvcc, env):
        for cand in (root / "include" / "cuda.h", *sorted(root.glob("targets/*/include/cuda.h"))):
            if cand.is_file():
                return cand
    return None


@dataclass(frozen=True)
class NvidiaGpu:
    name: str
    compute_cap: str  # "8.6"

    @property
    def arch(self) -> str:  # CMAKE_CUDA_ARCHITECTURES spelling: "86"
        return self.compute_cap.replace(".", "")


def detect_nvidia_gpus(env=None, run: Runner = default_run) -> Tuple[NvidiaGpu, ...]:
    exe = which("nvidia-smi", env)
    if not exe:
        return ()
    rc, out = run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"], PROBE_TIMEOUT)
    if rc != 0:
        return ()
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> Tuple[NvidiaGpu, ...]:
    gpus = []
    for line in text.splitlines():
        if "," not in line:
            continue
        name, cap = line.rsplit(",", 1)
        cap = cap.strip()
        if re.fullmatch(r"\d+\.\d+", cap):
            gpus.append(NvidiaGpu(name.strip(), cap))
    return tuple(gpus)


def nvidia_driver(exe: str, run: Runner = default_run) -> tuple:
    """(driver version, highest CUDA version the driver supports) from nvidia-smi."""
    driver = cuda = None
    rc, out = run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], PROBE_TIMEOUT)
    if rc == 0 and out.strip():
        driver = out.strip().splitlines()[0].strip()
    rc, out = run([exe], PROBE_TIMEOUT)  # the banner carries "CUDA Version: 12.4"
    if rc == 0:
        m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
        if m:
            cuda = (int(m.group(1)), int(m.group(2)))
    return driver, cuda


def detect(env=None, run: Runner = default_run, platform: Optional[str] = None) -> dict:
    """What a CUDA build needs to know (Toolchain.extra)."""
    nvcc = detect_nvcc(env, run)
    return {"nvcc": nvcc, "cublas": detect_cublas(nvcc, env), "nvidia_gpus": detect_nvidia_gpus(env, run)}


# -- the build -----------------------------------------------------------------------------

def toolkit_found(extra: dict) -> bool:
    return extra["nvcc"].found


def preflight(extra: dict, nix: str) -> List[str]:
    """What is missing for a CUDA build of llama.cpp (each with how to get it)."""
    if not extra["nvcc"].found:
        return ["nvcc, the CUDA toolkit (https://developer.nvidia.com/cuda-downloads, "
                f"apt-get install nvidia-cuda-toolkit; {nix})"]
    if "cublas" in extra and not extra["cublas"].found:
        return [f"cuBLAS (libcublas), which ggml-cuda links: {extra['nvcc'].path} has no libcublas "
                "beside it (install the full CUDA toolkit, e.g. cuda-libraries-dev or libcublas-dev; "
                f"{nix})"]
    return []


SWITCHES = (("{P}_CUDA", "ON"),)


def options(sw: Switches, req, det) -> None:
    """CUDA architectures (--cuda-arch, else the GPUs nvidia-smi lists, else what this nvcc
    can target) and cuBLAS from NVIDIA's PyPI wheel."""
    sw.table(SWITCHES)
    archs = split_list(req.cuda_arch)
    if archs:
        sw.set("CMAKE_CUDA_ARCHITECTURES", ";".join(a.replace(".", "") for a in archs))
    elif det.cuda_archs:
        sw.set("CMAKE_CUDA_ARCHITECTURES", ";".join(sorted(set(det.cuda_archs))))
        sw.notes.append(f"CUDA architectures from nvidia-smi: {sw.defines['CMAKE_CUDA_ARCHITECTURES']}")
    elif det.nvcc_archs:
        # GGML_NATIVE would ask for "native", which fails without a GPU: upstream's portable
        # list instead, cut to what this nvcc can target (CUDA 13 dropped sm_50..sm_70).
        archs = [a for a in UPSTREAM_CUDA_ARCHS if re.match(r"\d+", a).group() in det.nvcc_archs]
        sw.set("CMAKE_CUDA_ARCHITECTURES", ";".join(archs))
        sw.notes.append(f"no --cuda-arch and no GPU detected: CMAKE_CUDA_ARCHITECTURES="
                        f"{sw.defines['CMAKE_CUDA_ARCHITECTURES']} (what this nvcc supports; --cuda-arch 89 builds "
                        "one and is much faster)")
    else:
        sw.notes.append("no --cuda-arch and no GPU detected: upstream's default architecture list (slower build)")
    if det.cublas_wheel:
        lib, include = det.cublas_wheel
        # FindCUDAToolkit looks for libcublas.so beside the toolkit; the wheel has only
        # libcublas.so.N (and libcublasLt.so.N) in site-packages/nvidia/cuXX/lib.
        sw.set("CUDA_cublas_LIBRARY", lib)
        sw.set("CUDA_cublasLt_LIBRARY", str(Path(lib).with_name(Path(lib).name.replace("libcublas.", "libcublasLt."))))
        if include:
            sw.set("CMAKE_CUDA_FLAGS", f"-I{include}")
        sw.notes.append(f"cuBLAS from NVIDIA's PyPI wheel: {lib}")


# -- doctor --------------------------------------------------------------------------------

def gpu_check(env=None, run: Runner = default_run) -> Tuple[Check, Tuple[NvidiaGpu, ...], Optional[tuple]]:
    """(the gpu-nvidia line, the GPUs, the highest CUDA version the driver supports)."""
    smi = which("nvidia-smi", env)
    if not smi:
        return Check("gpu-nvidia", OK, "no NVIDIA GPU (nvidia-smi not found)"), (), None
    gpus = detect_nvidia_gpus(env, run)
    if not gpus:
        rc, out = run([smi], PROBE_TIMEOUT)
        said = (out.strip().splitlines() or ["no output"])[0] if rc != 127 else "cannot run"
        return (Check("gpu-nvidia", WARN, f"nvidia-smi found but lists no GPU: {said}",
                      "Load the NVIDIA driver (reboot after installing it) or remove the stale nvidia-smi."), (), None)
    driver, driver_cuda = nvidia_driver(smi, run)
    names = ", ".join(f"{g.name} (compute {g.compute_cap})" for g in gpus)
    extra = f"; driver {driver}" if driver else ""
    extra += f", supports CUDA <= {driver_cuda[0]}.{driver_cuda[1]}" if driver_cuda else ""
    return Check("gpu-nvidia", OK, names + extra), gpus, driver_cuda


def toolkit_check(env=None, run: Runner = default_run, gpus: Sequence[NvidiaGpu] = (),
                  driver_cuda: Optional[tuple] = None, requested: bool = False) -> Check:
    """The cuda-toolkit line: nvcc, whether it can target these GPUs and the driver, cuBLAS."""
    nvcc = detect_nvcc(env, run)
    if not nvcc.found:
        return toolkit_missing("cuda-toolkit", "NVIDIA GPU found" if gpus else "no NVIDIA GPU found",
                               "no CUDA toolkit (nvcc not found)", "CUDA", requested,
                               "Install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads) or "
                               "`nix develop .#cuda`; without it use --backend vulkan.")
    detail = nvcc.describe()
    if nvcc.origin != "system":
        detail += " (not on PATH)"
    problems, hints = [], []
    arches = nvcc_arches(nvcc.path, run)
    if arches is not None and gpus:
        unsupported = [g for g in gpus if g.arch not in arches]
        if unsupported and arches:
            names = ", ".join(f"{g.name} (sm_{g.arch})" for g in unsupported)
            problems.append(f"nvcc {version_str(nvcc.version)} cannot target {names}; "
                            f"it supports sm_{arches[0]} and newer")
            hints.append("Use a CUDA toolkit that still supports that GPU (CUDA 12.x for Maxwell/Pascal/Volta), "
                         "or --backend vulkan.")
    if driver_cuda and nvcc.version and tuple(nvcc.version[:2]) > driver_cuda:
        problems.append(f"the driver supports CUDA <= {driver_cuda[0]}.{driver_cuda[1]} but nvcc is "
                        f"{version_str(nvcc.version)}: built binaries will not start")
        hints.append("Update the NVIDIA driver, or install a CUDA toolkit no newer than the driver supports.")
    if nvcc.origin != "system":
        hints.append(f"Add {Path(nvcc.path).parent} to PATH (or set CUDACXX={nvcc.path}).")
    if problems:
        return Check("cuda-toolkit", WARN, detail + ": " + "; ".join(problems), " ".join(hints))
    if nvcc.origin != "system":
        return Check("cuda-toolkit", WARN, detail, " ".join(hints))
    cublas = detect_cublas(nvcc, env)
    detail += f"; cuBLAS {cublas.path} ({cublas.origin})" if cublas.found else "; no cuBLAS (see build-preflight)"
    return Check("cuda-toolkit", OK, detail + (f"; targets sm_{arches[0]}+" if arches else ""))
