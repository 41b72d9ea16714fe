"""Build llama.cpp (CMake, any backend) or llamafile from the locked source.

`build()` is the library entry point; `pylmserv build` is a thin layer over it. The
up-to-date path reads the lock and one stamp file and returns: no toolchain probes, no
CMake, no hashing of the tree.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform as _platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.errors import BuildError, ConfigError, ToolMissingError, UsageError
from ..pins.config import load_project
from ..store import records as stamps
from ..store.layout import home
from ..store.trees import ensure_source, store_path
from . import toolchain as tc
from .llama_cpp import (BACKENDS, BUILD_TIMEOUT, CONFIGURE_TIMEOUT, DEFAULT_TARGETS, LOG_NAME, MAPPING_VERSION,
                        Detected, Request, backend_env, builtin_features, find_outputs, install_files,
                        make_commands, map_options, point_current, preflight, run_logged, scan_features,
                        shared_libs)
from .llamafile import build_llamafile
from .result import BuildResult
from .toolchain import detect_toolchain

log = logging.getLogger("pylmserv.build")

ENGINES = ("llama.cpp", "llamafile")
SOURCE_NAME = "llama-cpp"  # the [sources.llama-cpp] entry of pylmserv.lock


def build(what: str = "llama.cpp", backend: str = "cpu", targets: Optional[Sequence[str]] = None,
          cuda_arch: Optional[str] = None, gpu_targets: Optional[str] = None, portable: bool = False,
          jobs: Optional[int] = None, prefix: Optional[Path] = None, cmake_args: Sequence[str] = (),
          force: bool = False, dry_run: bool = False, source_dir: Optional[Path] = None,
          config: Optional[Path] = None, lock: Optional[Path] = None,
          reproducible: Optional[bool] = None) -> BuildResult:
    """Build `what` for `backend`; a no-op (cache_hit=True) when the stamp says it is done.
    `reproducible` (default: on for portable builds) makes the same lock and options give
    the same bytes in any PYLMSERV_HOME and build directory."""
    if what == "llamafile":
        return build_llamafile(backend=backend, jobs=jobs, prefix=prefix, dry_run=dry_run, force=force,
                               config=config, lock=lock, source_dir=source_dir, cuda_arch=cuda_arch,
                               gpu_targets=gpu_targets)
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
    """Seed-compatible entry: build llama.cpp and install its binaries under `output_dir`/bin."""
    return build("llama.cpp", backend=backend or ("cuda" if cuda else "cpu"), jobs=jobs,
                 prefix=Path(output_dir), force=force, **kwargs)


def output_digests(outputs: Dict[str, Path], build_dir: Path) -> Dict[str, str]:
    """sha256 of every built file that ships (binaries and the shared libraries beside them):
    recorded in the stamp, so the fast path reports them without reading the files."""
    files = {Path(p).name: Path(p) for p in outputs.values()}
    files.update({p.name: p for p in shared_libs(build_dir)})
    out = {}
    for name, path in sorted(files.items()):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


class LlamaCppBuild:
    """One llama.cpp build: key -> (fast path | detect, preflight, fetch, configure, build) -> install."""

    def __init__(self, req, prefix=None, force=False, source_dir=None, config=None, lock=None):
        self.req = req
        self.force = force
        self.prefix = Path(prefix).expanduser().resolve() if prefix else None
        self.source_dir = Path(source_dir).expanduser().resolve() if source_dir else None
        self.config, self.lock = config, lock
        self.home = home()
        self.start = time.monotonic()
        self.entry = None
        self.rev: Optional[str] = None
        if self.source_dir is None:
            self.entry = self._lock_entry()
            self.rev = self.entry.rev or self.entry.get("ref")
        elif not (self.source_dir / "CMakeLists.txt").is_file():
            raise UsageError(f"--source {self.source_dir}: no CMakeLists.txt there",
                             hint="Pass the top directory of a llama.cpp checkout.")
        self.detected = self._cheap_detection()
        self.inputs = self._inputs()
        self.key = stamps.build_key(self.inputs)
        self.build_dir = self.home / "builds" / f"llama.cpp-{req.backend}-{self.key}"
        self.stamp_path = self.build_dir / stamps.STAMP_NAME

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
        gfx: Tuple[str, ...] = ()
        if req.backend == "cuda" and not req.cuda_arch:
            cuda_archs = tuple(sorted({g.arch for g in tc.detect_nvidia_gpus()}))
        if req.backend == "rocm" and not req.gpu_targets:
            gfx = tc.detect_rocm().gfx_targets
        return Detected(platform=sys.platform, openssl=tc.detect_openssl_headers(),
                        blas_vendor=tc.detect_blas() if req.backend == "blas" else None,
                        cuda_archs=cuda_archs, gfx_targets=gfx,
                        source_date_epoch="SOURCE_DATE_EPOCH" in os.environ)

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
                         "gfx": list(det.gfx_targets)},
        }

    # -- the pipeline -------------------------------------------------------------------

    def run(self, dry_run: bool = False) -> BuildResult:
        if dry_run:
            return self._dry_run()
        if not self.force and self.source_dir is None:
            stamp = stamps.read_stamp(self.stamp_path)
            if stamps.is_up_to_date(stamp, self.req.targets, inputs=self.inputs):
                log.debug("up to date: %s", self.build_dir)
                return self._finish(stamp.output_paths(), cache_hit=True, notes=("up to date: nothing to do",),
                                    sha256=stamp.extra.get("sha256") or {})
        return self._build()

    def _plan(self, tc, source: Path, features):
        mapping = map_options(self.req, features, self.detected, self.rev)
        launcher = tc.ccache.path if tc.ccache.found else None
        env = dict(mapping.env)  # reproducible builds: SOURCE_DATE_EPOCH, CCACHE_BASEDIR
        env.update(backend_env(self.req.backend, tc.extra.get("rocm")))
        cmds = make_commands(tc.cmake.path or "cmake", tc.ninja.path, source, self.build_dir, mapping,
                             self.req.targets, self.req.jobs, launcher, self.req.backend, env)
        return mapping, cmds, env

    def _dry_run(self) -> BuildResult:
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
        mapping, cmds, _ = self._plan(tc, source, features)
        detected = tuple(tc.describe()) + (f"options: {features.origin}",)
        return BuildResult("llama.cpp", self.req.backend, {}, self.build_dir, self._prefix_dir(),
                           time.monotonic() - self.start, False, self.key, source, tuple(cmds.lines()),
                           detected, tuple(notes) + mapping.notes, dry_run=True)

    def _build(self) -> BuildResult:
        from filelock import FileLock

        tc = detect_toolchain(self.req.backend)
        warnings = preflight(self.req.backend, tc)
        for w in warnings:
            log.warning("warning: %s", w)
        if self.source_dir is not None:
            source = self.source_dir
        else:
            source = ensure_source(self.entry, self.home)
        features = scan_features(source)
        mapping, cmds, benv = self._plan(tc, source, features)
        for note in mapping.notes:
            log.warning("note: %s", note)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.build_dir) + ".lock", timeout=6 * 3600):
            if not self.force and self.source_dir is None:
                stamp = stamps.read_stamp(self.stamp_path)  # another process may have just finished it
                if stamps.is_up_to_date(stamp, self.req.targets, inputs=self.inputs):
                    return self._finish(stamp.output_paths(), cache_hit=True, notes=("built by a concurrent run",),
                                        sha256=stamp.extra.get("sha256") or {})
            stamps.remove_stamp(self.stamp_path)  # a failed build must not look done
            log_file = self.build_dir / LOG_NAME
            log_file.write_text(f"# pylmserv build llama.cpp ({self.req.backend}) {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            env = dict(os.environ)
            env.update(benv)
            if tc.ccache.found and tc.ccache.name == "ccache" and "CCACHE_BASEDIR" not in env:
                # relative paths in the cache key: builds in other keyed dirs share hits
                env["CCACHE_BASEDIR"] = str(self.home)
            log.info("configuring llama.cpp (%s) in %s", self.req.backend, self.build_dir)
            t0 = time.monotonic()
            run_logged(cmds.configure, log_file, env, CONFIGURE_TIMEOUT, "configure")
            log.info("building %s (-j%s)", " ".join(self.req.targets), cmds.build[-1])
            run_logged(cmds.build, log_file, env, BUILD_TIMEOUT, "build")
            seconds = time.monotonic() - t0
            outputs = find_outputs(self.build_dir, self.req.targets)
            missing = [t for t in self.req.targets if t not in outputs]
            if missing:
                raise BuildError(f"the build finished but produced no {', '.join(missing)}; log: {log_file}",
                                 hint="Check the --target names (e.g. llama-cli, llama-server, llama-bench).")
            digests = output_digests(outputs, self.build_dir)
            stamp = stamps.make_stamp(self.inputs, outputs, seconds=seconds,
                                      extra={"commands": cmds.lines(), "defines": dict(mapping.defines),
                                             "source": str(source), "toolchain": tc.describe(),
                                             "sha256": digests})
            stamps.write_stamp(self.stamp_path, stamp)
        return self._finish(outputs, cache_hit=False, notes=tuple(warnings) + mapping.notes, source=source,
                            commands=tuple(cmds.lines()), sha256=digests)

    # -- install --------------------------------------------------------------------------

    def _prefix_dir(self) -> Path:
        if self.prefix is not None:
            return self.prefix
        return self.home / "bin" / f"llama.cpp-{self.req.backend}" / self.key

    def _finish(self, outputs: Dict[str, Path], cache_hit: bool, notes=(), source=None, commands=(),
                sha256=None) -> BuildResult:
        prefix = self._prefix_dir()
        bindir = prefix / "bin" if self.prefix is not None else prefix
        wanted = {t: outputs[t] for t in self.req.targets}
        installed = install_files(wanted, bindir, with_libs=self.build_dir / "bin")
        current = None
        if self.prefix is None:
            current = point_current(prefix)
        return BuildResult("llama.cpp", self.req.backend, installed, self.build_dir, prefix,
                           time.monotonic() - self.start, cache_hit, self.key, source, commands, (),
                           tuple(notes), current=current, sha256=dict(sha256 or {}))
