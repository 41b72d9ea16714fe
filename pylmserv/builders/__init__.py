"""Build llama.cpp (CMake, any backend) or llamafile from the locked source.

`build()` is the library entry point; `pylmserv build` is a thin layer over it. The
up-to-date path reads the lock and one stamp file and returns: no toolchain probes, no
CMake, no hashing of the tree.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform as _platform
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.errors import BuildError, ConfigError, ToolMissingError, UsageError
from ..pins.config import load_project
from ..store.layout import home
# The toolchain's probes and records, the store's trees (archive, NAR, git, the download
# engine), auto's detection and the CUDA link checks are imported where they are used: an
# up-to-date build reads the lock and one stamp and must stay within Python start + 100 ms
# (docs/build.md), and these modules cost ~25 ms it never uses. Speed only, no cycle is
# dodged. The stat-only detections that are part of the key are in probes.py.
from . import probes
from .base import BuildSkeleton, Compiled
from .llama_cpp import (BACKENDS, BUILD_TIMEOUT, CONFIGURE_TIMEOUT, DEFAULT_TARGETS, LOG_NAME, MAPPING_VERSION,
                        Detected, Request, backend_env, builtin_features, find_outputs, make_commands, map_options,
                        preflight, run_logged, scan_features)
from .result import BuildResult

log = logging.getLogger("pylmserv.build")

ENGINES = ("llama.cpp", "llamafile")
SOURCE_NAME = "llama-cpp"  # the [sources.llama-cpp] entry of pylmserv.lock


def build(what: str = "llama.cpp", backend: str = "cpu", targets: Optional[Sequence[str]] = None,
          cuda_arch: Optional[str] = None, gpu_targets: Optional[str] = None, portable: bool = False,
          jobs: Optional[int] = None, prefix: Optional[Path] = None, cmake_args: Sequence[str] = (),
          force: bool = False, dry_run: bool = False, source_dir: Optional[Path] = None,
          config: Optional[Path] = None, lock: Optional[Path] = None, module_only: bool = False,
          cuda_blas: Optional[str] = None, reproducible: Optional[bool] = None) -> BuildResult:
    """Build `what` for `backend` ("auto": what this machine has, see resolve_backend); a no-op
    (cache_hit=True) when the stamp says it is done. `reproducible` (default: on for portable
    llama.cpp builds): the same lock and options give the same bytes in any PYLMSERV_HOME."""
    backend, choice = resolve_backend(what, backend, source_dir=source_dir, config=config, lock=lock)
    result = _build(what, backend, targets, cuda_arch, gpu_targets, portable, jobs, prefix, cmake_args, force,
                    dry_run, source_dir, config, lock, module_only, cuda_blas, reproducible)
    return dataclasses.replace(result, auto=choice.describe()) if choice is not None else result


def _build(what, backend, targets, cuda_arch, gpu_targets, portable, jobs, prefix, cmake_args, force, dry_run,
           source_dir, config, lock, module_only, cuda_blas, reproducible=None) -> BuildResult:
    if what == "llamafile":
        from .llamafile import build_llamafile  # lazy: its modules cost ~15 ms that llama.cpp builds never use

        return build_llamafile(backend=backend, jobs=jobs, prefix=prefix, dry_run=dry_run, force=force,
                               config=config, lock=lock, source_dir=source_dir, cuda_arch=cuda_arch,
                               gpu_targets=gpu_targets, module_only=module_only, cuda_blas=cuda_blas or "tinyblas")
    if reproducible is not None and what != "llama.cpp":
        raise UsageError("--reproducible applies to `pylmserv build llama.cpp` only")
    if module_only or cuda_blas:
        raise UsageError("--module-only and --cuda-blas apply to `pylmserv build llamafile` only",
                         hint="llama.cpp's CUDA backend always links cuBLAS.")
    if what != "llama.cpp":
        raise UsageError(f"unknown build target {what!r}", hint="Use `pylmserv build llama.cpp` or `pylmserv build llamafile`.")

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", hint="Use one of: " + ", ".join(BACKENDS) + ".")
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    req = Request(backend=backend, targets=tuple(dict.fromkeys(targets or DEFAULT_TARGETS)),
                  cuda_arch=cuda_arch, gpu_targets=gpu_targets, portable=portable, jobs=jobs,
                  cmake_args=tuple(cmake_args), reproducible=portable if reproducible is None else reproducible)
    return LlamaCppBuild(req, prefix=prefix, force=force, source_dir=source_dir, config=config, lock=lock).run(dry_run)


def build_llama_cpp(output_dir, cuda: bool = False, backend: Optional[str] = None, jobs: Optional[int] = None,
                    force: bool = False, **kwargs) -> BuildResult:
    """Seed-compatible entry: build llama.cpp and install its binaries under `output_dir`/bin.
    cuda=True meant "CUDA if available": that is --backend auto (cuda on an NVIDIA machine
    with a usable toolkit, else the best this machine has)."""
    return build("llama.cpp", backend=backend or ("auto" if cuda else "cpu"), jobs=jobs,
                 prefix=Path(output_dir), force=force, **kwargs)


def resolve_backend(what: str, backend: str, source_dir: Optional[Path] = None, config: Optional[Path] = None,
                    lock: Optional[Path] = None):
    """(backend, BackendChoice or None): "auto" becomes what doctor's detection finds usable
    here (auto.choose_backend); the choice and its reasons are logged."""
    if backend != "auto":
        return backend, None
    from . import toolchain as tc  # lazy for speed (see the imports above)
    from .auto import choose_backend

    min_hip = tc.DEFAULT_MIN_HIP
    tree = Path(source_dir) if source_dir else (stored_llama_source(config, lock) if what == "llama.cpp" else None)
    if tree is not None:
        min_hip = tc.required_hip_version(tree) or min_hip
    choice = choose_backend(what, min_hip=min_hip)
    log.warning("%s", choice.describe())
    return choice.backend, choice


def stored_llama_source(config=None, lock=None) -> Optional[Path]:
    """The locked llama.cpp tree when it is already in the store (auto reads its HIP minimum)."""
    from ..store.trees import store_path  # lazy for speed (see the imports above)

    try:
        entry = load_project(config, lock).lock.entry("sources", SOURCE_NAME)
    except ConfigError:
        return None
    path = store_path(entry, home()) if entry is not None and entry.mode == "nar" else None
    return path if path is not None and path.is_dir() else None


class LlamaCppBuild(BuildSkeleton):
    """One llama.cpp build on the shared skeleton: prepare = detect, preflight, source
    checks, fetch; compile = (driver stub,) configure, build, link check."""

    engine = "llama.cpp"

    def __init__(self, req, prefix=None, force=False, source_dir=None, config=None, lock=None):
        super().__init__(prefix, force, source_dir)
        self.req = req
        self.backend = req.backend
        self.config, self.lock = config, lock
        self.entry = None
        self.rev: Optional[str] = None
        if self.source_dir is None:
            self.entry = self._lock_entry()
            self.rev = self.entry.rev or self.entry.get("ref")
        elif not (self.source_dir / "CMakeLists.txt").is_file():
            raise UsageError(f"--source {self.source_dir}: no CMakeLists.txt there",
                             hint="Pass the top directory of a llama.cpp checkout.")
        self.detected = self._cheap_detection()
        self._identify(req.backend, self._inputs())

    # -- identity ---------------------------------------------------------------------

    def _lock_entry(self):
        project = load_project(self.config, self.lock)
        entry = project.lock.entry("sources", SOURCE_NAME)
        if entry is None:
            raise ConfigError(f"no [sources.{SOURCE_NAME}] in {project.lock_path}",
                              hint=f"Run `pylmserv prefetch {SOURCE_NAME}`, or build a local tree with --source DIR.")
        if entry.mode != "nar":
            raise ConfigError(f"[sources.{SOURCE_NAME}] in {project.lock_path} is mode {entry.mode!r}; "
                              "a source tree needs mode = \"nar\"", hint=f"Run `pylmserv prefetch --refresh {SOURCE_NAME}`.")
        return entry

    def _cheap_detection(self):
        """Facts that change the -D switches. Stat calls, plus nvidia-smi/rocminfo only when
        the user left the GPU architecture to us."""
        req = self.req
        cuda_archs: Tuple[str, ...] = ()
        nvcc_archs: Tuple[str, ...] = ()
        gfx: Tuple[str, ...] = ()
        cublas_wheel = None
        if req.backend in ("cuda", "rocm"):
            from . import toolchain as tc  # lazy for speed (see the imports above): GPU builds only
        if req.backend == "cuda":
            nvcc = tc.Tool("nvcc", tc.which("nvcc"))  # stat only: no version probe on the fast path
            cublas = tc.detect_cublas(nvcc)
            if cublas.origin == "pip-wheel":
                cublas_wheel = (cublas.path, cublas.include or "")
            if not req.cuda_arch:
                cuda_archs = tuple(sorted({g.arch for g in tc.detect_nvidia_gpus()}))
                if not cuda_archs and nvcc.found:
                    rc, out = tc.default_run([nvcc.path, "--list-gpu-arch"])
                    nvcc_archs = tuple(sorted(set(re.findall(r"compute_(\d+)", out)), key=int)) if rc == 0 else ()
        if req.backend == "rocm" and not req.gpu_targets:
            gfx = tc.detect_rocm().gfx_targets
        return Detected(platform=sys.platform, openssl=probes.detect_openssl_headers(),
                        blas_vendor=probes.detect_blas() if req.backend == "blas" else None,
                        cuda_archs=cuda_archs, gfx_targets=gfx,
                        source_date_epoch="SOURCE_DATE_EPOCH" in os.environ, nvcc_archs=nvcc_archs,
                        cublas_wheel=cublas_wheel)

    def _inputs(self) -> dict:
        req, det = self.req, self.detected
        source = self.entry.hash.sri if self.entry is not None else f"path:{self.source_dir}"
        return {
            "engine": "llama.cpp", "mapping": MAPPING_VERSION, "source": source, "rev": self.rev,
            "backend": req.backend, "targets": sorted(req.targets), "cuda_arch": req.cuda_arch,
            "gpu_targets": req.gpu_targets, "portable": req.portable, "cmake_args": list(req.cmake_args),
            "build_type": req.build_type, "platform": f"{sys.platform}-{_platform.machine()}",
            **({"reproducible": True} if req.reproducible else {}),  # absent when off: older keys stay valid
            "detected": {"openssl": det.openssl, "blas": det.blas_vendor, "cuda_archs": list(det.cuda_archs),
                         "gfx": list(det.gfx_targets),
                         # CUDA only: the keys of other backends' builds stay what they were
                         **({"nvcc_archs": list(det.nvcc_archs),
                             "cublas_wheel": list(det.cublas_wheel) if det.cublas_wheel else None}
                          if req.backend == "cuda" else {})},
        }

    # -- the pipeline -------------------------------------------------------------------

    def wanted(self):
        return self.req.targets

    def select(self, outputs: Dict[str, Path]) -> Dict[str, Path]:
        return {t: outputs[t] for t in self.req.targets}

    def libs_dir(self) -> Path:
        return self.build_dir / "bin"

    def _plan(self, tc, source: Path, features):
        mapping = map_options(self.req, features, self.detected, self.rev)
        stub = self._driver_stub(tc)
        if stub is not None:
            # ggml-cuda links CUDA::cuda_driver (VMM); FindCUDAToolkit looks for it in stubs/
            mapping = dataclasses.replace(
                mapping, defines=mapping.defines + (("CUDA_cuda_driver_LIBRARY", str(stub)),),
                notes=mapping.notes + (f"this CUDA toolkit has no stubs/libcuda.so: linking against a generated "
                                       f"stub {stub} (SONAME libcuda.so.1, the driver's exports from cuda.h)",))
        launcher = tc.ccache.path if tc.ccache.found else None
        env = dict(mapping.env)  # reproducible builds: SOURCE_DATE_EPOCH, CCACHE_BASEDIR=""
        env.update(backend_env(self.req.backend, tc.extra.get("rocm")))
        cmds = make_commands(tc.cmake.path or "cmake", tc.ninja.path, source, self.build_dir, mapping,
                             self.req.targets, self.req.jobs, launcher, self.req.backend, env)
        return mapping, cmds, env

    def _driver_stub(self, tc) -> Optional[Path]:
        """Where the libcuda link stub goes when the toolkit has none (NVIDIA's PyPI wheels)."""
        from .toolchain import find_cuda_stubs  # lazy for speed (see the imports above)

        nvcc = tc.extra.get("nvcc")
        if self.req.backend != "cuda" or nvcc is None or not nvcc.found or find_cuda_stubs(nvcc) is not None:
            return None
        return self.build_dir / "cuda-stubs" / "libcuda.so"

    def _check_cuda_links(self, tc, outputs: Dict[str, Path], stub: Optional[Path]) -> None:
        """readelf/nm: every cu*/cublas* symbol the binaries use comes from a NEEDED library."""
        from .cudalink import check_gpu_links  # lazy for speed (see the imports above)
        from .toolchain import cuda_roots

        nvcc = tc.extra["nvcc"]
        dirs = [stub.parent] if stub is not None else []
        cublas = tc.extra.get("cublas")
        if cublas is not None and cublas.found:
            dirs.append(Path(cublas.path).parent)
        for root in cuda_roots(nvcc):
            dirs += [root / "lib64", root / "lib64" / "stubs", *sorted(root.glob("targets/*/lib"))]
        for name, path in sorted(outputs.items()):
            check_gpu_links(path, [d for d in dirs if d.is_dir()])

    def dry_run(self) -> BuildResult:
        from ..store.trees import store_path  # lazy for speed (see the imports above)
        from .toolchain import detect_toolchain

        tc = detect_toolchain(self.req.backend)
        notes: List[str] = []
        try:
            notes += preflight(self.req.backend, tc)
        except ToolMissingError as exc:
            notes.append(f"preflight would fail: {exc.message}")
        if self.source_dir is not None:
            source, features = self.source_dir, scan_features(self.source_dir)
        else:
            source = store_path(self.entry, self.home)
            features = scan_features(source) if source.is_dir() else builtin_features(self.rev)
            if not source.is_dir():
                notes.append(f"source not fetched yet (dry run fetches nothing): would fetch {self.entry.url}")
        try:
            source_checks(self.req.backend, tc, source if source.is_dir() else None, self.req.cmake_args)
        except ToolMissingError as exc:
            notes.append(f"preflight would fail: {exc.message}")
        mapping, cmds, _ = self._plan(tc, source, features)
        detected = tuple(tc.describe()) + (f"options: {features.origin}",)
        return BuildResult("llama.cpp", self.req.backend, {}, self.build_dir, self.prefix_dir(),
                           time.monotonic() - self.start, False, self.key, source, tuple(cmds.lines()),
                           detected, tuple(notes) + mapping.notes, dry_run=True)

    def prepare(self) -> Path:
        from ..store.trees import ensure_source  # lazy for speed (see the imports above)
        from .toolchain import detect_toolchain

        tc = detect_toolchain(self.req.backend)
        self.warnings = preflight(self.req.backend, tc)
        for w in self.warnings:
            log.warning("warning: %s", w)
        source = self.source_dir if self.source_dir is not None else ensure_source(self.entry, self.home)
        source_checks(self.req.backend, tc, source, self.req.cmake_args)  # before configure: minutes before the compiler would fail
        self.mapping, self.cmds, self.benv = self._plan(tc, source, scan_features(source))
        for note in self.mapping.notes:
            log.warning("note: %s", note)
        self.tc = tc
        return source

    def compile(self, source: Path) -> Compiled:
        tc, mapping, cmds = self.tc, self.mapping, self.cmds
        stub = self._driver_stub(tc)
        if stub is not None:
            from .cudalink import cuda_header_driver_symbols, write_cuda_driver_stub  # lazy for speed (above)
            from .toolchain import find_cuda_header

            header = find_cuda_header(tc.extra["nvcc"])
            if header is None:
                raise ToolMissingError(f"the CUDA toolkit of {tc.extra['nvcc'].path} has neither stubs/libcuda.so "
                                       "nor include/cuda.h", hint="Install the full CUDA toolkit (cuda-toolkit).")
            write_cuda_driver_stub(cuda_header_driver_symbols(header), stub)
        log_file = self.build_dir / LOG_NAME
        log_file.write_text(f"# pylmserv build llama.cpp ({self.req.backend}) {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        env = dict(os.environ)
        env.update(self.benv)
        if tc.ccache.found and tc.ccache.name == "ccache" and "CCACHE_BASEDIR" not in env:
            # relative paths in the cache key: builds in other keyed dirs share hits
            env["CCACHE_BASEDIR"] = str(self.home)
        log.info("configuring llama.cpp (%s) in %s", self.req.backend, self.build_dir)
        run_logged(cmds.configure, log_file, env, CONFIGURE_TIMEOUT, "configure")
        log.info("building %s (-j%s)", " ".join(self.req.targets), cmds.build[-1])
        run_logged(cmds.build, log_file, env, BUILD_TIMEOUT, "build")
        outputs = find_outputs(self.build_dir, self.req.targets)
        missing = [t for t in self.req.targets if t not in outputs]
        if missing:
            raise BuildError(f"the build finished but produced no {', '.join(missing)}; log: {log_file}",
                             hint="Check the --target names (e.g. llama-cli, llama-server, llama-bench).")
        if self.req.backend == "cuda":
            self._check_cuda_links(tc, outputs, stub)
        return Compiled(outputs, tuple(self.warnings) + mapping.notes, tuple(cmds.lines()),
                        {"defines": dict(mapping.defines), "toolchain": tc.describe()})


def source_checks(backend: str, tc, source: Optional[Path], cmake_args: Sequence[str] = ()) -> None:
    """What the pinned source needs of the toolkit, read from the source itself: the HIP
    version its ggml-hip/CMakeLists.txt requires, the vk:: names its ggml-vulkan uses
    (source None: not fetched yet; ROCm is then held to current llama.cpp's minimum).
    Raises ToolMissingError (one line, the ways out in the hint); doctor says the same."""
    from .toolchain import (DEFAULT_MIN_HIP, VULKAN_WAYS_OUT, detect_vulkan_sdk, hip_too_old, hip_version,
                            required_hip_version, vulkan_headers_too_old)  # lazy for speed (see the imports above)
    if backend == "rocm":
        rocm = tc.extra["rocm"]
        needed = required_hip_version(source) if source is not None else DEFAULT_MIN_HIP
        where = "ggml/src/ggml-hip/CMakeLists.txt" if source is not None else "current llama.cpp"
        if needed and rocm.hipcc.found:
            problem = hip_too_old(rocm.hipcc, hip_version(rocm.hipcc), needed, where)
            if problem:
                raise ToolMissingError(f"cannot build llama.cpp (rocm): {problem}",
                                       hint="Install a newer ROCm and put its bin/ first on PATH (or set ROCM_PATH), "
                                            "then rerun; `pylmserv doctor --backend rocm` checks it.")
    elif backend == "vulkan" and source is not None:
        sdk = tc.extra.get("vulkan_sdk") or detect_vulkan_sdk()
        for arg in cmake_args:  # headers the user points CMake at (e.g. a pinned Vulkan-Headers tree)
            m = re.match(r"(?:-D)?Vulkan_INCLUDE_DIR(?::\w+)?=(.+)", arg)
            if m:
                sdk = detect_vulkan_sdk(include_dirs=[Path(m.group(1))])
        problem = vulkan_headers_too_old(source, sdk)
        if problem:
            raise ToolMissingError(f"cannot build llama.cpp (vulkan): {problem}", hint=VULKAN_WAYS_OUT)
