"""Detect the build toolchain and the GPUs of this machine.

Pure functions returning frozen dataclasses; each takes an optional `env` (whose PATH
is searched) and `run` (how to run a probe command) so tests can point them at stand-in
scripts. `pylmserv doctor` imports these too. Nothing here raises for a missing tool:
absence is data (`found=False`); the builder's preflight turns it into an error.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..core.proc import probe, which  # noqa: F401 (which: used by builders and doctor)
# the stat-only detections of a build's key live in probes.py (the up-to-date path loads it alone)
from .probes import BLAS_HEADERS, detect_blas, detect_openssl_headers, openssl_header_paths  # noqa: F401


Runner = Callable[[Sequence[str], float], Tuple[int, str]]

MIN_CMAKE = (3, 18)  # ggml-cuda needs 3.18; llama.cpp itself 3.14
MIN_NINJA = (1, 10)
PROBE_TIMEOUT = 20.0


def default_run(argv: Sequence[str], timeout: float = PROBE_TIMEOUT) -> Tuple[int, str]:
    """Run a probe; (returncode, stdout+stderr). Never raises for a missing/broken tool."""
    proc = probe(argv, timeout=timeout)
    if proc is None:
        return 127, f"cannot run {argv[0]}"
    return proc.returncode, proc.stdout + proc.stderr


def parse_version(text: str) -> Optional[Tuple[int, ...]]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


def version_str(v: Optional[Tuple[int, ...]]) -> str:
    return ".".join(map(str, v)) if v else "?"


@dataclass(frozen=True)
class Tool:
    """One external tool: where it is and what version it reports."""

    name: str
    path: Optional[str] = None
    version: Optional[Tuple[int, ...]] = None
    origin: str = "system"  # system | pip-wheel | env
    detail: str = ""

    @property
    def found(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        if not self.found:
            return f"{self.name}: not found"
        ver = f" {version_str(self.version)}" if self.version else ""
        origin = f" ({self.origin})" if self.origin != "system" else ""
        return f"{self.name}{ver}: {self.path}{origin}"


def probe_tool(name: str, args: Sequence[str] = ("--version",), env=None, run: Runner = default_run,
               exe: Optional[str] = None, origin: str = "system") -> Tool:
    path = exe or which(name, env)
    if not path:
        return Tool(name)
    rc, out = run([path, *args], PROBE_TIMEOUT)
    first = next((ln.strip() for ln in out.splitlines() if ln.strip()), "")
    return Tool(name, path, parse_version(out) if rc == 0 else None, origin, first)


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


@dataclass(frozen=True)
class Library(Tool):
    """A library found on disk: `path` is the file; `include` its headers when they are elsewhere."""

    include: Optional[str] = None

    @property
    def libdir(self) -> Optional[str]:
        return str(Path(self.path).parent) if self.path else None

    def link_args(self, lib: str) -> List[str]:
        """-L/-l for this library; `-l:libX.so.N` when only the versioned file exists (the
        NVIDIA PyPI wheels ship libcublas.so.13 without the libcublas.so link)."""
        if not self.path:
            return [f"-l{lib}"]
        name = Path(self.path).name
        flag = f"-l{lib}" if name in (f"lib{lib}.so", f"lib{lib}.a") else f"-l:{name}"
        return [f"-L{self.libdir}", flag]


def python_lib_dirs() -> List[Path]:
    """site-packages directories of this Python (where `pip install nvidia-cublas` puts it)."""
    import site

    dirs = [Path(p) for p in sys.path if p and p.endswith(("site-packages", "dist-packages"))]
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
        dirs.append(Path(site.getusersitepackages()))
    except AttributeError:  # virtualenv's old site module
        pass
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


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


def detect_glslc(env=None, run: Runner = default_run) -> Tool:
    return probe_tool("glslc", env=env, run=run)


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


PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x1022": "amd", "0x8086": "intel", "0x106b": "apple"}


def detect_gpu_vendors(env=None, run: Runner = default_run, sysfs: Path = Path("/sys/class/drm"),
                       platform: str = sys.platform) -> Tuple[str, ...]:
    """Which GPU vendors this machine has: nvidia-smi, rocminfo, then PCI display devices."""
    vendors: List[str] = []
    if detect_nvidia_gpus(env, run):
        vendors.append("nvidia")
    rocminfo = which("rocminfo", env)
    if rocminfo:
        rc, out = run([rocminfo], PROBE_TIMEOUT)
        if rc == 0 and parse_rocminfo(out):
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
class Xcode:
    developer_dir: Optional[str]
    metal: bool  # the `metal` shader compiler is reachable through xcrun

    @property
    def found(self) -> bool:
        return self.developer_dir is not None


def detect_xcode(env=None, run: Runner = default_run, platform: str = sys.platform) -> Xcode:
    if platform != "darwin":
        return Xcode(None, False)
    sel = which("xcode-select", env)
    dev = None
    if sel:
        rc, out = run([sel, "-p"], PROBE_TIMEOUT)
        dev = out.strip() if rc == 0 and out.strip() else None
    metal = False
    xcrun = which("xcrun", env)
    if xcrun:
        rc, _ = run([xcrun, "--find", "metal"], PROBE_TIMEOUT)
        metal = rc == 0
    return Xcode(dev, metal)


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
            elif isinstance(value, RocmInfo):
                lines.append(value.hipcc.describe())
                lines.append(f"rocm: {value.rocm_path or 'not found'}; gfx targets: {','.join(value.gfx_targets) or 'none detected'}")
            elif isinstance(value, Xcode):
                lines.append(f"xcode: {value.developer_dir or 'not found'}; metal compiler: {'yes' if value.metal else 'no'}")
            elif isinstance(value, VulkanSdk):
                lines.append(f"vulkan headers: {value.headers or 'not found'} ({version_str(value.header_version)}); "
                             f"spirv-headers: {'yes' if value.spirv_headers else 'no'}; loader: {value.loader or 'not found'}")
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
    extra: Dict[str, object] = {}
    if backend == "cuda":
        extra["nvcc"] = detect_nvcc(env, run)
        extra["cublas"] = detect_cublas(extra["nvcc"], env)
        extra["nvidia_gpus"] = detect_nvidia_gpus(env, run)
    elif backend == "rocm":
        extra["rocm"] = detect_rocm(env, run)
    elif backend == "vulkan":
        extra["glslc"] = detect_glslc(env, run)
        extra["vulkan_sdk"] = detect_vulkan_sdk(env, run)
    elif backend == "metal":
        extra["xcode"] = detect_xcode(env, run, platform)
    elif backend == "blas":
        extra["blas_vendor"] = detect_blas(platform)
    if backend in ("cuda", "rocm", "vulkan"):
        extra["gpu_vendors"] = detect_gpu_vendors(env, run, sysfs, platform)
    return Toolchain(detect_cmake(env, run), detect_ninja(env, run), cc, cxx, detect_ccache(env, run), extra)


# -- ROCm/HIP version: what hipcc is, what the source needs ------------------------------------

DEFAULT_MIN_HIP = (6, 1)  # current llama.cpp (ggml/src/ggml-hip/CMakeLists.txt), used before the source is fetched


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


# -- Vulkan: devices, the SDK packages, and whether the headers are new enough ---------------------

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


VULKAN_WAYS_OUT = ("Install newer Vulkan headers (the LunarG Vulkan SDK, or libvulkan-dev from a newer distro), "
                   "use `nix develop .#vulkan`, or pin KhronosGroup/Vulkan-Headers as a source and pass "
                   "--cmake-arg -DVulkan_INCLUDE_DIR=<its include dir>; or build --backend cpu.")


def find_cuda_header(nvcc: Tool, env=None) -> Optional[Path]:
    for root in cuda_roots(nvcc, env):
        for cand in (root / "include" / "cuda.h", *sorted(root.glob("targets/*/include/cuda.h"))):
            if cand.is_file():
                return cand
    return None
