"""Build llama.cpp with CMake for one backend: option mapping, preflight, configure,
build, install, stamp.

The option mapping is a pure function of (backend, what the source tree's CMake files
declare, the user's choices), so it is unit-tested per backend and per upstream version
without a GPU. Which spelling a switch has (GGML_CUDA vs LLAMA_CUDA, LLAMA_USE_PREBUILT_UI
vs ..._WEBUI, LLAMA_OPENSSL vs LLAMA_CURL) is read from the pinned tree itself.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..core.errors import BuildError, ToolMissingError, UsageError
from ..core.log import DEBUG, get_logger

log = get_logger("pylmserv.build")

BACKENDS = ("cpu", "blas", "cuda", "rocm", "vulkan", "metal")
DEFAULT_TARGETS = ("llama-cli", "llama-server", "llama-bench")
MAPPING_VERSION = 2  # bump when the option mapping changes: new build keys, no stale reuse
LOG_NAME = "pylmserv-build.log"
CONFIGURE_TIMEOUT = 900
# Reproducible builds: the fixed time (1980-01-01, valid for zip too) when the user set none,
# and where the source and build trees appear in the binaries whatever their real paths.
SOURCE_DATE_EPOCH = "315532800"
MAPPED_SOURCE, MAPPED_BUILD = "/pylmserv/source", "/pylmserv/build"
BUILD_TIMEOUT = 6 * 3600

# Where the CMake switches of a llama.cpp tree are declared (paths vary by version).
CMAKE_FILES = ("CMakeLists.txt", "ggml/CMakeLists.txt", "tools/ui/CMakeLists.txt", "tools/server/CMakeLists.txt",
               "examples/server/CMakeLists.txt", "ggml/src/ggml-hip/CMakeLists.txt",
               "ggml/src/ggml-cuda/CMakeLists.txt", "common/CMakeLists.txt")

# Legacy spellings users still paste from old guides -> today's names (translated only
# when the tree declares the new name and not the old one).
RENAMED = {
    "LLAMA_CUBLAS": "GGML_CUDA", "LLAMA_CUDA": "GGML_CUDA", "GGML_CUBLAS": "GGML_CUDA",
    "LLAMA_HIPBLAS": "GGML_HIP", "GGML_HIPBLAS": "GGML_HIP", "LLAMA_HIP_UMA": "GGML_HIP_UMA",
    "LLAMA_METAL": "GGML_METAL", "LLAMA_METAL_EMBED_LIBRARY": "GGML_METAL_EMBED_LIBRARY",
    "LLAMA_VULKAN": "GGML_VULKAN", "LLAMA_NATIVE": "GGML_NATIVE", "LLAMA_BLAS": "GGML_BLAS",
    "LLAMA_BLAS_VENDOR": "GGML_BLAS_VENDOR", "LLAMA_RPC": "GGML_RPC", "LLAMA_SYCL": "GGML_SYCL",
    "LLAMA_CUDA_F16": "GGML_CUDA_F16", "LLAMA_AVX2": "GGML_AVX2", "LLAMA_AVX512": "GGML_AVX512",
    "LLAMA_OPENMP": "GGML_OPENMP", "LLAMA_LTO": "GGML_LTO", "LLAMA_CCACHE": "GGML_CCACHE",
    "LLAMA_BUILD_WEBUI": "LLAMA_BUILD_UI", "LLAMA_USE_PREBUILT_WEBUI": "LLAMA_USE_PREBUILT_UI",
    "LLAMA_CURL": "LLAMA_OPENSSL", "AMDGPU_TARGETS": "GPU_TARGETS",
}

# Switches of the current tree (the vendored llama.cpp of llama-cpp-python 0.3.36 and the
# locked b9941): used by --dry-run before the source is in the store.
_CURRENT = frozenset("""
LLAMA_BUILD_TESTS LLAMA_BUILD_EXAMPLES LLAMA_BUILD_TOOLS LLAMA_BUILD_SERVER LLAMA_BUILD_COMMON LLAMA_BUILD_APP
LLAMA_BUILD_UI LLAMA_USE_PREBUILT_UI LLAMA_OPENSSL LLAMA_BUILD_NUMBER LLAMA_BUILD_COMMIT BUILD_SHARED_LIBS
GGML_NATIVE GGML_CPU_ALL_VARIANTS GGML_BACKEND_DL GGML_BLAS GGML_BLAS_VENDOR GGML_CUDA GGML_HIP GGML_VULKAN
GGML_METAL GGML_METAL_EMBED_LIBRARY GGML_CCACHE GPU_TARGETS AMDGPU_TARGETS
""".split())
# Mid-2024 .. 2025 trees: ggml names, LLAMA_CURL, the web UI still called WEBUI.
_GGML_CURL = (_CURRENT - {"LLAMA_OPENSSL", "LLAMA_BUILD_UI", "LLAMA_USE_PREBUILT_UI", "LLAMA_BUILD_APP",
                          "GPU_TARGETS"}) | {"LLAMA_CURL"}
# Trees before the ggml rename (b3173, June 2024).
_LEGACY = frozenset("""
LLAMA_BUILD_TESTS LLAMA_BUILD_EXAMPLES LLAMA_BUILD_SERVER BUILD_SHARED_LIBS LLAMA_NATIVE LLAMA_BLAS
LLAMA_BLAS_VENDOR LLAMA_CUDA LLAMA_HIPBLAS LLAMA_VULKAN LLAMA_METAL LLAMA_METAL_EMBED_LIBRARY LLAMA_CCACHE
LLAMA_CURL AMDGPU_TARGETS
""".split())


# The records below are NamedTuples, not frozen dataclasses: this module is imported by every
# up-to-date `build`, and a dataclass costs ~4 M instructions to create at import, a NamedTuple
# under 1 M (store/records.py does the same).
class SourceFeatures(NamedTuple):
    """The CMake cache variables a llama.cpp tree declares, and where we learned them."""

    names: FrozenSet[str]
    origin: str

    def has(self, name: str) -> bool:
        return name in self.names

    @property
    def ggml(self) -> str:
        """The prefix of backend switches: GGML (since b3173) or LLAMA (before)."""
        return "GGML" if "GGML_NATIVE" in self.names or "GGML_CUDA" in self.names else "LLAMA"


_DECL = re.compile(r"""\boption\s*\(\s*([A-Za-z0-9_]+)|\bset\s*\(\s*([A-Za-z0-9_]+)\s+[^)]*\bCACHE\b"""
                   r"""|\bDEFINED\s+([A-Z][A-Za-z0-9_]+)|\bllama_option_depr\s*\(\s*\w+\s+([A-Z0-9_]+)""")


def scan_features(source_dir: Path) -> SourceFeatures:
    """Read the switches a tree declares from its CMake files (no CMake run needed)."""
    names = set()
    for rel in CMAKE_FILES:
        try:
            text = (Path(source_dir) / rel).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for m in _DECL.finditer(text):
            names.add(next(g for g in m.groups() if g))
        if "GPU_TARGETS" in text:
            names.add("GPU_TARGETS" if re.search(r"(?<!AMD)GPU_TARGETS", text) else "AMDGPU_TARGETS")
    # llama_option_depr(... LLAMA_CURL) marks a name as *ignored*, not as a switch.
    ignored = set(re.findall(r"llama_option_depr\s*\(\s*WARNING\s+(\w+)\s*\)", _read(source_dir, "CMakeLists.txt")))
    deprecated = set(re.findall(r"llama_option_depr\s*\(\s*\w+\s+(\w+)\s+\w+\s*\)", _read(source_dir, "CMakeLists.txt")))
    names -= ignored | deprecated
    if not names:
        raise UsageError(f"{source_dir}: not a llama.cpp source tree (no CMakeLists.txt with llama options)",
                         hint="Pass the top directory of a llama.cpp checkout to --source.")
    return SourceFeatures(frozenset(names), f"scanned {source_dir}")


def _read(root: Path, rel: str) -> str:
    try:
        return (Path(root) / rel).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def builtin_features(rev: Optional[str]) -> SourceFeatures:
    """Best guess from a release tag (bNNNN) when the tree is not unpacked yet (dry runs)."""
    n = build_number(rev)
    if n is not None and n < 3173:
        return SourceFeatures(_LEGACY, f"built-in profile for {rev} (pre-ggml names)")
    if n is not None and n < 7000:
        return SourceFeatures(_GGML_CURL, f"built-in profile for {rev} (ggml names, LLAMA_CURL)")
    return SourceFeatures(_CURRENT, f"built-in profile for {rev or 'a current tree'}")


def build_number(rev: Optional[str]) -> Optional[int]:
    m = re.fullmatch(r"b(\d+)", rev or "")
    return int(m.group(1)) if m else None


# -- the option mapping -------------------------------------------------------------------

# Only the programs: no tests, no examples, no downloads during the build.
PROGRAMS_ONLY = (("LLAMA_BUILD_TESTS", "OFF"), ("LLAMA_BUILD_EXAMPLES", "OFF"), ("LLAMA_BUILD_TOOLS", "ON"),
                 ("LLAMA_BUILD_SERVER", "ON"), ("LLAMA_BUILD_COMMON", "ON"))
# --portable where the tree can: every CPU variant as a loadable backend beside the binaries.
PORTABLE_DL = (("GGML_BACKEND_DL", "ON"), ("GGML_CPU_ALL_VARIANTS", "ON"),
               ("BUILD_SHARED_LIBS", "ON"),  # GGML_BACKEND_DL requires it
               ("CMAKE_BUILD_RPATH_USE_ORIGIN", "ON"))  # $ORIGIN rpath: binaries + libs relocate together

class Request(NamedTuple):
    """What the user asked for, resolved once and passed down (immutable)."""

    backend: str = "cpu"
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    cuda_arch: Optional[str] = None  # "86;89" or "86,89"
    gpu_targets: Optional[str] = None  # "gfx1100,gfx90a"
    portable: bool = False
    jobs: Optional[int] = None
    cmake_args: Tuple[str, ...] = ()
    build_type: str = "Release"
    reproducible: bool = False  # same lock + options -> same bytes (path maps, fixed time, deterministic ar/ld)


class Detected(NamedTuple):
    """Machine facts the mapping depends on (filled by the caller; tests pass them in)."""

    platform: str = sys.platform
    openssl: bool = False
    blas_vendor: Optional[str] = None
    cuda_archs: Tuple[str, ...] = ()  # from nvidia-smi compute_cap
    gfx_targets: Tuple[str, ...] = ()  # from rocminfo
    source_date_epoch: bool = False
    nvcc_archs: Tuple[str, ...] = ()  # what `nvcc --list-gpu-arch` accepts (no GPU, no --cuda-arch)
    cublas_wheel: Optional[Tuple[str, str]] = None  # (libcublas.so.N, include dir) of NVIDIA's PyPI wheel


class Mapping_(NamedTuple):
    defines: Tuple[Tuple[str, str], ...]
    env: Tuple[Tuple[str, str], ...] = ()
    notes: Tuple[str, ...] = ()
    reproducible: bool = False  # make_commands adds the -ffile-prefix-map flags (it knows the paths)

    def as_dict(self) -> Dict[str, str]:
        return dict(self.defines)


def map_options(req: Request, features: SourceFeatures, det: Detected,
                rev: Optional[str] = None) -> Mapping_:
    """The -D switches for `req` on a tree with `features`: pure, deterministic, ordered.
    What every build gets is here; each backend's own switches are its module's table and
    `options` (builders/backends/)."""
    # lazy for speed: the backends and the toolchain are not on the up-to-date path
    # (builders/__init__.py); no cycle is dodged
    from .backends import Switches
    from .toolchain import BACKEND_MODULES

    if req.backend not in BACKENDS:
        raise UsageError(f"unknown backend {req.backend!r}", hint="Use one of: " + ", ".join(BACKENDS) + ".")
    sw = Switches(features)
    env: Dict[str, str] = {}
    sw.set("CMAKE_BUILD_TYPE", req.build_type)
    sw.table(PROGRAMS_ONLY)
    for current, legacy in (("LLAMA_BUILD_UI", "LLAMA_BUILD_WEBUI"), ("LLAMA_USE_PREBUILT_UI", "LLAMA_USE_PREBUILT_WEBUI")):
        # npm build / HF bucket download of the web UI: neither is pinned, so neither runs
        if sw.has(current):
            sw.set(current, "OFF")
        elif sw.has(legacy):
            sw.set(legacy, "OFF")
    if sw.has("LLAMA_OPENSSL"):
        sw.set("LLAMA_OPENSSL", "ON" if det.openssl else "OFF")
        if not det.openssl:
            sw.notes.append("OpenSSL headers not found: LLAMA_OPENSSL=OFF (llama-server/-cli cannot download over "
                            "https; pylmserv fetch does that)")
    elif sw.has("LLAMA_CURL"):
        sw.set("LLAMA_CURL", "OFF")  # needs libcurl-dev; pylmserv fetches models itself
    # `llama-cli --version` names the locked rev (the tree has no .git for CMake to ask)
    n = build_number(rev)
    if n is not None and sw.has("LLAMA_BUILD_NUMBER"):
        sw.set("LLAMA_BUILD_NUMBER", str(n))
    if rev and sw.has("LLAMA_BUILD_COMMIT"):
        sw.set("LLAMA_BUILD_COMMIT", rev[:10] if re.fullmatch(r"[0-9a-f]{40}", rev) else rev)

    if req.portable:
        sw.put(f"{sw.prefix}_NATIVE", "OFF")
        if sw.has("GGML_CPU_ALL_VARIANTS") and sw.has("GGML_BACKEND_DL") and det.platform != "darwin":
            for name, value in PORTABLE_DL:
                sw.set(name, value)
        else:
            sw.notes.append("this llama.cpp has no GGML_CPU_ALL_VARIANTS/GGML_BACKEND_DL: portable = generic CPU code")
            sw.put("BUILD_SHARED_LIBS", "OFF")
    else:
        sw.put(f"{sw.prefix}_NATIVE", "ON")
        sw.put("BUILD_SHARED_LIBS", "OFF")  # self-contained binaries: install is a copy
        if det.source_date_epoch:
            sw.notes.append("SOURCE_DATE_EPOCH is set: upstream would silently turn GGML_NATIVE off; "
                            "pylmserv passes GGML_NATIVE=ON explicitly (use --portable for a portable build)")

    module = BACKEND_MODULES.get(req.backend)
    if module is not None:
        module.options(sw, req, det)

    d, notes = sw.defines, sw.notes
    if req.reproducible:
        _reproducible(req, det, d, env, notes)

    for raw in req.cmake_args:
        name, value, note = translate_arg(raw, features)
        if note:
            notes.append(note)
        if name is not None:
            d[name] = value
    return Mapping_(tuple(d.items()), tuple(sorted(env.items())), tuple(notes), reproducible=req.reproducible)


def _reproducible(req: Request, det: Detected, d: Dict[str, str], env: Dict[str, str], notes: List[str]) -> None:
    """What leaks time and place into llama.cpp's binaries, fixed: __DATE__/__TIME__
    (SOURCE_DATE_EPOCH), build-path RPATHs ($ORIGIN), archive member times and order
    (ar/ranlib -D), the build-id (a hash of the linked bytes); __FILE__ and debug paths are
    mapped in make_commands. ccache stays transparent: no base-dir path rewriting."""
    env["SOURCE_DATE_EPOCH"] = os.environ.get("SOURCE_DATE_EPOCH") or SOURCE_DATE_EPOCH
    env["CCACHE_BASEDIR"] = ""  # rewriting absolute paths to relative ones would defeat the path maps
    d["CMAKE_BUILD_RPATH_USE_ORIGIN"] = "ON"
    if det.platform.startswith("linux"):
        for lang in ("C", "CXX"):
            d[f"CMAKE_{lang}_ARCHIVE_CREATE"] = "<CMAKE_AR> qcD <TARGET> <LINK_FLAGS> <OBJECTS>"
            d[f"CMAKE_{lang}_ARCHIVE_APPEND"] = "<CMAKE_AR> qD <TARGET> <LINK_FLAGS> <OBJECTS>"
            d[f"CMAKE_{lang}_ARCHIVE_FINISH"] = "<CMAKE_RANLIB> -D <TARGET>"
        for kind in ("EXE", "SHARED", "MODULE"):
            d[f"CMAKE_{kind}_LINKER_FLAGS"] = "-Wl,--build-id=sha1"
    if not req.portable and d.get("GGML_NATIVE", d.get("LLAMA_NATIVE")) == "ON":
        notes.append("reproducible native build: identical bytes on machines with the same CPU features "
                     "(-march=native); --portable gives one binary for every x86-64/arm64 CPU")
    if req.backend in ("cuda", "rocm"):
        notes.append(f"reproducible {req.backend} build: host code is path-mapped; device code was not verified")


def translate_arg(raw: str, features: SourceFeatures) -> Tuple[Optional[str], str, Optional[str]]:
    """`-DNAME=VALUE` or `NAME=VALUE` (legacy names translated) -> (name, value, note)."""
    text = raw[2:] if raw.startswith("-D") else raw
    if "=" not in text:
        raise UsageError(f"--cmake-arg {raw!r}: expected -DNAME=VALUE", hint="e.g. --cmake-arg -DGGML_CUDA_F16=ON")
    name, value = text.split("=", 1)
    name = name.split(":", 1)[0]  # -DNAME:BOOL=ON
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise UsageError(f"--cmake-arg {raw!r}: {name!r} is not a CMake variable name")
    new = RENAMED.get(name)
    if new and not features.has(name) and features.has(new):
        if name == "LLAMA_CURL":
            return new, value, f"{name} is ignored by this llama.cpp; using {new}={value} instead"
        return new, value, f"translated legacy {name} -> {new}"
    if new and not features.has(name) and name == "LLAMA_CURL":
        return None, value, "LLAMA_CURL is ignored by this llama.cpp (no replacement switch): dropped"
    if not features.has(name) and not name.startswith(("CMAKE_", "BUILD_")):
        return name, value, f"{name} is not declared by this llama.cpp (passed through; CMake may ignore it)"
    return name, value, None


def _split_list(text: Optional[str]) -> List[str]:
    return [p.strip() for p in re.split(r"[;,\s]+", text or "") if p.strip()]


# -- the shared build cache's key ----------------------------------------------------------

CACHE_KEY_VERSION = 1  # bump when what the cache key covers changes


def portable_cache_inputs(inputs: Mapping, libc_family: str) -> Optional[dict]:
    """What names a build in a shared cache: the build key's inputs (LlamaCppBuild._inputs)
    less what only the builder's host knows, plus the C library family the binaries link
    against. Only portable builds of a locked source qualify (None otherwise): a native build
    is tuned to the builder's CPU, and a local --source tree has no content hash.

    Kept: source (NAR hash) and rev, the option mapping's version, backend, targets,
    --portable/--reproducible, --cmake-arg, build type, GPU architectures asked for or
    detected, target OS and machine (`linux-x86_64`), the detections that change the -D
    switches (OpenSSL on/off, BLAS vendor). Dropped: paths on the builder (the cuBLAS wheel's
    directory: only its library's name is kept). Not in the key but recorded in the signed
    manifest: the builder's toolchain and C library version (a substitute built against a
    newer glibc than the host's is refused at install)."""
    if not inputs.get("portable") or not str(inputs.get("source", "")).startswith("sha256-"):
        return None
    out = json.loads(json.dumps(dict(inputs), sort_keys=True, default=str))
    det = out.get("detected") or {}
    if det.get("cublas_wheel"):
        det["cublas_wheel"] = Path(det["cublas_wheel"][0]).name
    out["libc"] = libc_family
    out["cache_key_version"] = CACHE_KEY_VERSION
    return out


# -- commands -----------------------------------------------------------------------------

class Commands(NamedTuple):
    configure: Tuple[str, ...]
    build: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...] = ()

    def lines(self) -> List[str]:
        import shlex  # lazy: the up-to-date build path never prints commands

        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        return [(prefix + " " if prefix else "") + shlex.join(self.configure), shlex.join(self.build)]


def make_commands(cmake: str, ninja: Optional[str], source: Path, build_dir: Path, mapping: Mapping_,
                  targets: Sequence[str], jobs: Optional[int], launcher: Optional[str],
                  backend: str, env: Mapping[str, str] = ()) -> Commands:
    argv = [cmake, "-S", str(source), "-B", str(build_dir)]
    if ninja:
        argv += ["-G", "Ninja"]
        import shutil  # lazy: not on the up-to-date build path

        if os.path.basename(ninja) != "ninja" or not shutil.which("ninja"):
            argv.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
    defines = dict(mapping.defines)
    if mapping.reproducible:
        # __FILE__ (GGML_ASSERT), debug info and macros name the mapped paths, not this machine's.
        pairs = [(source, MAPPED_SOURCE), (build_dir, MAPPED_BUILD)]
        pairs += [(Path(p).resolve(), m) for p, m in pairs if Path(p).resolve() != Path(p)]  # symlinked homes
        maps = " ".join(f"-ffile-prefix-map={p}={m}" for p, m in pairs)
        for lang in ("C", "CXX"):
            key = f"CMAKE_{lang}_FLAGS"
            defines[key] = f"{defines[key]} {maps}" if defines.get(key) else maps
    if launcher:
        langs = ["C", "CXX"] + (["CUDA"] if backend == "cuda" else []) + (["HIP"] if backend == "rocm" else [])
        for lang in langs:
            defines.setdefault(f"CMAKE_{lang}_COMPILER_LAUNCHER", launcher)
    argv += [f"-D{k}={v}" for k, v in defines.items()]
    build = [cmake, "--build", str(build_dir), "--config", defines.get("CMAKE_BUILD_TYPE", "Release"),
             "--target", *targets, "-j", str(jobs or os.cpu_count() or 2)]
    return Commands(tuple(argv), tuple(build), tuple(sorted(dict(env).items())))


# -- preflight ----------------------------------------------------------------------------

NIX_HINT = "or enter a shell that has it: `nix develop .#{shell}`"


def preflight(backend: str, tc, platform: str = sys.platform) -> List[str]:
    """Warnings; raises ToolMissingError naming every missing tool with how to get it."""
    from .probe import version_str  # lazy for speed: not on the up-to-date path (builders/__init__.py)
    from .toolchain import BACKEND_MODULES, MIN_CMAKE

    missing: List[str] = []
    warnings: List[str] = []
    shell = {"cuda": "cuda", "rocm": "rocm", "vulkan": "vulkan"}.get(backend, "default")
    nix = NIX_HINT.format(shell=shell) if shell != "default" else "or `nix develop`"
    if not tc.cmake.found:
        missing.append(f"cmake >= {version_str(MIN_CMAKE)} (pip install cmake ninja - the PyPI wheels; "
                       f"or apt-get install cmake; {nix})")
    elif not tc.cmake.version or tc.cmake.version < MIN_CMAKE:
        missing.append(f"cmake >= {version_str(MIN_CMAKE)}: {tc.cmake.path} is {version_str(tc.cmake.version)} "
                       f"(pip install -U cmake puts a newer one first)")
    for comp, pkg in ((tc.cc, "a C compiler"), (tc.cxx, "a C++ compiler")):
        if not comp.found:
            how = "xcode-select --install" if platform == "darwin" else "apt-get install build-essential"
            missing.append(f"{pkg} ({comp.name}: {how}; or set CC/CXX)")
    module = BACKEND_MODULES.get(backend)
    if module is not None:
        missing += module.preflight(tc.extra, nix)
        want = getattr(module, "GPU_VENDOR", None)
        mismatch = _vendor_mismatch(backend, want, tc.extra.get("gpu_vendors", ())) if want else None
        if mismatch:  # no toolkit either: it cannot start; a toolkit: a build host, say so
            (warnings if module.toolkit_found(tc.extra) else missing).append(mismatch)
    if missing:
        raise ToolMissingError(f"cannot build llama.cpp ({backend}): missing " + "; ".join(missing),
                               hint="Install the tools named above and rerun; `pylmserv build --dry-run` shows "
                                    "what was detected.")
    if not tc.ninja.found:
        warnings.append("ninja not found: using CMake's default generator (pip install ninja for faster builds)")
    return warnings


def _vendor_mismatch(backend: str, want: str, vendors: Sequence[str]) -> Optional[str]:
    if not vendors or want in vendors:
        return None
    other = [v for v in vendors if v in ("nvidia", "amd")]
    if not other:
        return None
    names = {"nvidia": "NVIDIA", "amd": "AMD"}
    suggest = {"nvidia": "cuda", "amd": "rocm"}
    got = other[0]
    return (f"--backend {backend} needs an {names[want]} GPU, but this machine's GPU is {names[got]}: "
            f"use --backend {suggest[got]} (or vulkan)")


# -- running ------------------------------------------------------------------------------

def run_logged(argv: Sequence[str], log_file: Path, env: Mapping[str, str], timeout: float, what: str) -> None:
    """Run a step, appending its output to `log_file`; progress on the logger every few seconds.
    A watchdog kills the step at `timeout` even when it prints nothing."""
    import shlex
    import subprocess
    import threading

    from ..core.proc import start_group, stop_group  # lazy for speed: not on the up-to-date build path

    last = time.monotonic()
    if os.path.islink(log_file):  # planted: removed as a link, never appended through
        os.unlink(log_file)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    with os.fdopen(fd, "ab") as fh:
        fh.write(f"\n$ {shlex.join(argv)}\n".encode())
        fh.flush()
        try:
            # Its own process group: `cmake --build` does not pass signals on to ninja and
            # the compilers, so the whole group is stopped (core.proc.stop_group).
            proc = start_group(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env))
        except OSError as exc:
            raise ToolMissingError(f"cannot run {argv[0]}: {exc.strerror}") from None
        fired = threading.Event()

        def kill():
            fired.set()
            stop_group(proc)

        watchdog = threading.Timer(timeout, kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                fh.flush()  # the log is where a user looks while a long step runs
                now = time.monotonic()
                if now - last >= 5 or log.isEnabledFor(DEBUG):
                    text = line.decode("utf-8", "replace").rstrip()
                    if text:
                        log.info("%s: %s", what, text[:200])
                    last = now
            rc = proc.wait()
        finally:
            watchdog.cancel()
            stop_group(proc)  # the step and anything it left running
    if fired.is_set():
        raise BuildError(f"{what} timed out after {timeout:.0f} s; full log: {log_file}",
                         hint="Rerun (it continues where it stopped), or use fewer targets.")
    if rc != 0:
        first = first_error(log_file)
        raise BuildError(f"{what} failed (exit {rc}); full log: {log_file}\n{first}".rstrip(),
                         hint="Fix the cause shown above and rerun: the build continues where it stopped.")


_ERROR = re.compile(r"(CMake Error|error:|Error \d+|FAILED:|fatal error|undefined reference|ninja: build stopped)")


def first_error(log_file: Path, context: int = 12) -> str:
    """The last step's first error line and what follows it (the log holds every step)."""
    try:
        text = Path(log_file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = text.splitlines()
    start = max((i for i, ln in enumerate(lines) if ln.startswith("$ ")), default=0)
    lines = lines[start:]
    for i, line in enumerate(lines):
        if _ERROR.search(line):
            return "\n".join(lines[i:i + context])
    return "\n".join(lines[-context:])


def exe_name(target: str, platform: str = sys.platform) -> str:
    return target + (".exe" if platform == "win32" else "")


def find_outputs(build_dir: Path, targets: Sequence[str]) -> Dict[str, Path]:
    """Built binaries: bin/<target> (single-config) or bin/Release/<target> (multi-config)."""
    out = {}
    for t in targets:
        for cand in (build_dir / "bin" / exe_name(t), build_dir / "bin" / "Release" / exe_name(t)):
            if cand.exists():
                out[t] = cand
                break
    return out
