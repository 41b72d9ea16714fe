"""Build llama.cpp (CMake, any backend) or llamafile from the locked source.

`build()` is the library entry point; `pylmserv build` is a thin layer over it. The
up-to-date path reads the lock and one stamp file and returns: no toolchain probes, no
CMake, no hashing of the tree.
"""
from __future__ import annotations

import os
import platform as _platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.errors import BuildError, ConfigError, ToolMissingError, UsageError
from ..core.log import get_logger
from ..pins.config import load_project
from ..store.layout import home
from .base import BuildSkeleton, Compiled
from .llama_cpp import (BACKENDS, BUILD_TIMEOUT, CONFIGURE_TIMEOUT, DEFAULT_TARGETS, LOG_NAME, MAPPING_VERSION,
                        Detected, Request, builtin_features, find_outputs, make_commands, map_options,
                        portable_cache_inputs, preflight, run_logged, scan_features)
from .result import BuildResult
from ..store import layout
from ..store import records as stamps
# The toolchain and the backends (their probes and records), the store's trees (archive,
# NAR, git, the download engine), the build cache and signing, auto's detection and the
# CUDA link checks are imported where they are used: an up-to-date build reads the lock
# and one stamp, and every module it loads counts against its budget (docs/build.md).
# Speed only: no cycle is dodged. The stat-only detection of the key is in probes.py.
from .probes import detect_openssl_headers

log = get_logger("pylmserv.build")


def _blas():
    from .backends import blas  # lazy for speed (see the imports above): --backend blas only

    return blas

ENGINES = ("llama.cpp", "llamafile")
SOURCE_NAME = "llama-cpp"  # the [sources.llama-cpp] entry of pylmserv.lock


def build(what: str = "llama.cpp", backend: str = "cpu", targets: Optional[Sequence[str]] = None,
          cuda_arch: Optional[str] = None, gpu_targets: Optional[str] = None, portable: bool = False,
          jobs: Optional[int] = None, prefix: Optional[Path] = None, cmake_args: Sequence[str] = (),
          force: bool = False, dry_run: bool = False, source_dir: Optional[Path] = None,
          config: Optional[Path] = None, lock: Optional[Path] = None, module_only: bool = False,
          cuda_blas: Optional[str] = None, reproducible: Optional[bool] = None, no_build: bool = False) -> BuildResult:
    """Build `what` for `backend` ("auto": what this machine has, see resolve_backend); a no-op
    (cache_hit=True) when the stamp says it is done. `reproducible` (default: on for portable
    llama.cpp builds): the same lock and options give the same bytes in any PYLMSERV_HOME.
    A portable llama.cpp build is first asked of the substituters ([cache]); `no_build`:
    substitute or fail, never compile."""
    backend, choice = resolve_backend(what, backend, source_dir=source_dir, config=config, lock=lock)
    result = _build(what, backend, targets, cuda_arch, gpu_targets, portable, jobs, prefix, cmake_args, force,
                    dry_run, source_dir, config, lock, module_only, cuda_blas, reproducible, no_build)
    return result.replace(auto=choice.describe()) if choice is not None else result


def _build(what, backend, targets, cuda_arch, gpu_targets, portable, jobs, prefix, cmake_args, force, dry_run,
           source_dir, config, lock, module_only, cuda_blas, reproducible=None, no_build=False) -> BuildResult:
    if no_build and (what != "llama.cpp" or not portable):
        raise UsageError("--no-build applies to portable llama.cpp builds (only those are substituted)",
                         hint="Add --portable: `pylmserv build llama.cpp --portable --no-build`.")
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
    return LlamaCppBuild(req, prefix=prefix, force=force, source_dir=source_dir, config=config, lock=lock,
                         no_build=no_build).run(dry_run)


def build_llama_cpp(output_dir, cuda: bool = False, backend: Optional[str] = None, jobs: Optional[int] = None,
                    force: bool = False, **kwargs) -> BuildResult:
    """Seed-compatible entry: build llama.cpp and install its binaries under `output_dir`/bin.
    cuda=True meant "CUDA if available": that is --backend auto (cuda on an NVIDIA machine
    with a usable toolkit, else the best this machine has)."""
    return build("llama.cpp", backend=backend or ("auto" if cuda else "cpu"), jobs=jobs,
                 prefix=Path(output_dir), force=force, **kwargs)


def push_builds(to: str, sign_key: Path, what: str = "llama.cpp", backends: Sequence[str] = (),
                config: Optional[Path] = None, lock: Optional[Path] = None) -> List[dict]:
    """Push every stamped portable build of the locked llama.cpp source (of `backends`, else
    all) to the build cache `to`, signed with the Nix-format secret key in `sign_key`; the
    signed manifests pushed. Its files are re-hashed against the stamp first."""
    if what != "llama.cpp":
        raise UsageError("only portable llama.cpp builds are pushed to a build cache",
                         hint="llamafile's outputs are single portable files: share them with `pylmserv pack`.")
    from ..core.signing import SecretKey  # lazy for speed (see the imports above)
    from ..transfer.buildcache import open_cache
    from .substitute import cache_key, libc, push as push_to

    key = SecretKey.read(sign_key)
    project = load_project(config, lock)
    entry = project.lock.entry("sources", SOURCE_NAME)
    if entry is None:
        raise ConfigError(f"no [sources.{SOURCE_NAME}] in {project.lock_path}", hint=f"Run `pylmserv prefetch {SOURCE_NAME}`.")
    cache = open_cache(to)
    pushed = []
    for backend in backends or BACKENDS:
        for directory in layout.build_dirs("llama.cpp", backend, home()):
            stamp = stamps.read_stamp(directory / stamps.STAMP_NAME)
            if stamp is None or stamp.inputs.get("source") != entry.hash.sri or "substituted" in stamp.extra:
                continue
            inputs = portable_cache_inputs(stamp.inputs, libc()[0])
            targets = list(stamp.inputs.get("targets") or [])
            if inputs is None or not targets or not stamps.is_up_to_date(stamp, targets):
                continue
            pushed.append(push_to(cache, cache_key(inputs), inputs, stamp, "llama.cpp", backend, targets, key))
    if not pushed:
        raise UsageError(f"no portable llama.cpp build of the locked source {entry.hash.sri} to push",
                         hint="Build one first: `pylmserv build llama.cpp --portable`.")
    return pushed


def resolve_backend(what: str, backend: str, source_dir: Optional[Path] = None, config: Optional[Path] = None,
                    lock: Optional[Path] = None):
    """(backend, BackendChoice or None): "auto" becomes what doctor's detection finds usable
    here (auto.choose_backend); the choice and its reasons are logged."""
    if backend != "auto":
        return backend, None
    from .auto import choose_backend  # lazy for speed (see the imports above)
    from .backends import rocm

    min_hip = rocm.DEFAULT_MIN_HIP
    tree = Path(source_dir) if source_dir else (stored_llama_source(config, lock) if what == "llama.cpp" else None)
    if tree is not None:
        min_hip = rocm.required_hip_version(tree) or min_hip
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

    def __init__(self, req, prefix=None, force=False, source_dir=None, config=None, lock=None, no_build=False):
        super().__init__(prefix, force, source_dir, no_build=no_build)
        self._cache_config: dict = {}
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
        project = load_project(self.config, self.lock).use_as_gc_root()  # a build keeps its source
        self._cache_config = project.config.cache
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
        if req.backend == "cuda":
            from .backends import cuda  # lazy for speed (see the imports above): GPU builds only
            from .probe import Tool, default_run, which

            nvcc = Tool("nvcc", which("nvcc"))  # stat only: no version probe on the fast path
            cublas = cuda.detect_cublas(nvcc)
            if cublas.origin == "pip-wheel":
                cublas_wheel = (cublas.path, cublas.include or "")
            if not req.cuda_arch:
                cuda_archs = tuple(sorted({g.arch for g in cuda.detect_nvidia_gpus()}))
                if not cuda_archs and nvcc.found:
                    nvcc_archs = cuda.nvcc_arches(nvcc.path, default_run) or ()
        if req.backend == "rocm" and not req.gpu_targets:
            from .backends import rocm  # lazy for speed (see the imports above)

            gfx = rocm.detect_rocm().gfx_targets
        return Detected(platform=sys.platform, openssl=detect_openssl_headers(),
                        blas_vendor=_blas().detect_blas() if req.backend == "blas" else None,
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

    def cache_inputs(self) -> Optional[dict]:
        from .substitute import libc  # lazy for speed (see the imports above)

        return portable_cache_inputs(self.inputs, libc()[0])

    def cache_config(self):
        return self._cache_config

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
            mapping = mapping._replace(
                defines=mapping.defines + (("CUDA_cuda_driver_LIBRARY", str(stub)),),
                notes=mapping.notes + (f"this CUDA toolkit has no stubs/libcuda.so: linking against a generated "
                                       f"stub {stub} (SONAME libcuda.so.1, the driver's exports from cuda.h)",))
        launcher = tc.ccache.path if tc.ccache.found else None
        env = dict(mapping.env)  # reproducible builds: SOURCE_DATE_EPOCH, CCACHE_BASEDIR=""
        if self.req.backend == "rocm":
            from .backends import rocm  # lazy for speed (see the imports above)

            env.update(rocm.build_env(tc.extra.get("rocm")))
        cmds = make_commands(tc.cmake.path or "cmake", tc.ninja.path, source, self.build_dir, mapping,
                             self.req.targets, self.req.jobs, launcher, self.req.backend, env)
        return mapping, cmds, env

    def _driver_stub(self, tc) -> Optional[Path]:
        """Where the libcuda link stub goes when the toolkit has none (NVIDIA's PyPI wheels)."""
        nvcc = tc.extra.get("nvcc")
        if self.req.backend != "cuda" or nvcc is None or not nvcc.found:
            return None
        from .backends import cuda  # lazy for speed (see the imports above)

        if cuda.find_cuda_stubs(nvcc) is not None:
            return None
        return self.build_dir / "cuda-stubs" / "libcuda.so"

    def _check_cuda_links(self, tc, outputs: Dict[str, Path], stub: Optional[Path]) -> None:
        """readelf/nm: every cu*/cublas* symbol the binaries use comes from a NEEDED library."""
        nvcc = tc.extra["nvcc"]
        dirs = [stub.parent] if stub is not None else []
        cublas = tc.extra.get("cublas")
        if cublas is not None and cublas.found:
            dirs.append(Path(cublas.path).parent)
        from .backends import cuda  # lazy for speed (see the imports above)
        from .cudalink import check_gpu_links

        for root in cuda.cuda_roots(nvcc):
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
            from .backends import cuda  # lazy for speed (see the imports above)
            from .cudalink import cuda_header_driver_symbols, write_cuda_driver_stub

            header = cuda.find_cuda_header(tc.extra["nvcc"])
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
    """What the pinned source needs of the toolkit, read from the source itself (the
    backend module's `source_check`: the HIP version ggml-hip requires, the vk:: names
    ggml-vulkan uses; source None: not fetched yet). Raises ToolMissingError (one line,
    the ways out in the hint); doctor says the same."""
    from .toolchain import BACKEND_MODULES  # lazy for speed (see the imports above)

    check = getattr(BACKEND_MODULES.get(backend), "source_check", None)
    if check is not None:
        check(tc.extra, source, cmake_args)
