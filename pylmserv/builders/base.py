"""The one build skeleton both engines share (llama.cpp with CMake, llamafile with make).

key (hash of the inputs) -> fast path (a matching stamp: install and return, no toolchain
probe) -> prepare (preflight, fetch; outside the lock) -> build lock -> the stamp read again
(another process may have finished the same build meanwhile) -> stamp removed (a failed
build must not look done) -> compile -> stamp -> install (+ the `current` link of the
default prefix). The engines differ only in the hooks: what identifies a build, how it is
prepared and compiled, which outputs are installed.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

from ..core.errors import BuildError
from ..core.flock import FileLock
from ..core.log import get_logger
from ..core.record import Factory, Record
from ..store import records as stamps
from ..store import layout
from ..store.installs import install_files, point_current, real_dirs, shared_libs
from ..store.layout import home
from .result import BuildResult

log = get_logger("pylmserv.build")

LOCK_TIMEOUT = 6 * 3600  # a concurrent build of the same key may take this long


class Compiled(Record):
    """What a compile step hands back to the skeleton (a Record: every up-to-date `build`
    imports this module)."""

    __slots__ = ("outputs", "notes", "commands", "extra")
    _defaults = {"notes": (), "commands": (), "extra": Factory(dict)}
    outputs: Dict[str, Path]
    notes: Tuple[str, ...]
    commands: Tuple[str, ...]
    extra: Dict[str, object]  # recorded in the stamp


def output_digests(outputs: Mapping[str, Path], libs_dir: Optional[Path]) -> Dict[str, str]:
    """sha256 of every file that ships (the installed outputs and the shared libraries beside
    them), by file name: recorded in the stamp, so an up-to-date build reports them without
    reading the files (reproducible builds are compared by these)."""
    files = {Path(p).name: Path(p) for p in outputs.values()}
    files.update({p.name: p for p in (shared_libs(libs_dir.parent) if libs_dir is not None else [])})
    out = {}
    for name, path in sorted(files.items()):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


class BuildSkeleton:
    """Subclasses set `engine` and call `_identify(kind, inputs)` in __init__, then implement
    prepare() / compile() / dry_run() (and wanted() / libs_dir() where they differ)."""

    engine = ""

    def __init__(self, prefix: Optional[Path] = None, force: bool = False, source_dir: Optional[Path] = None,
                 no_build: bool = False):
        self.force = force
        self.no_build = no_build  # substitute or fail: never compile
        self.refusals: list = []  # substitutes refused, one line each (substitute.py)
        self.prefix = Path(prefix).expanduser().resolve() if prefix else None
        self.source_dir = Path(source_dir).expanduser().resolve() if source_dir else None
        self.home = home()
        self.start = time.monotonic()

    def _identify(self, kind: str, inputs: Mapping) -> None:
        self.kind = kind
        self.inputs = dict(inputs)
        self.key = stamps.build_key(self.inputs)
        self.build_dir = layout.build_dir(self.engine, kind, self.key, self.home)
        self.stamp_path = self.build_dir / stamps.STAMP_NAME

    # -- hooks ---------------------------------------------------------------------------

    def wanted(self) -> Optional[Sequence[str]]:
        """Output names that must be in the stamp (None: every recorded output)."""
        return None

    def select(self, outputs: Dict[str, Path]) -> Dict[str, Path]:
        """The outputs to install."""
        return outputs

    def libs_dir(self) -> Optional[Path]:
        """Where shared libraries to install beside the binaries are (None: none)."""
        return None

    def prepare(self) -> Path:
        """Preflight and fetch, outside the build lock; returns the source tree."""
        raise NotImplementedError

    def compile(self, source: Path) -> Compiled:
        """Compile under the build lock (the stamp is already removed)."""
        raise NotImplementedError

    def dry_run(self) -> BuildResult:
        raise NotImplementedError

    def cache_inputs(self) -> Optional[dict]:
        """What names this build in a shared build cache (substitute.py): the key's inputs less
        what only the builder's host knows. None (the default): never substituted."""
        return None

    def cache_config(self) -> Optional[Mapping]:
        """The project's [cache] table (substituters, trusted-public-keys)."""
        return None

    # -- the pipeline ----------------------------------------------------------------------

    def _reusable(self):
        """The stamp when it says this exact build is done (a local --source tree can change
        under the same key, so it is never reused)."""
        if self.force or self.source_dir is not None:
            return None
        stamp = stamps.read_stamp(self.stamp_path)
        if not stamps.is_up_to_date(stamp, self.wanted(), inputs=self.inputs):
            return None
        # A build's outputs are in its build directory; a stamp that names a file elsewhere
        # (edited, or copied from another build) is not this build's: build again rather than
        # install what it points at.
        inside = os.path.realpath(self.build_dir)
        for path in stamp.output_paths().values():
            real = os.path.realpath(path)
            if os.path.commonpath([inside, real]) != inside or real == inside:
                log.warning("warning: %s names an output outside its build directory (%s): building again",
                            self.stamp_path, path)
                return None
        return stamp

    def run(self, dry_run: bool = False) -> BuildResult:
        if dry_run:
            return self.dry_run()
        if os.path.islink(self.build_dir):  # planted (pylmserv makes none): never built into nor read
            os.unlink(self.build_dir)       # through; only the link goes, its target is untouched
        stamp = self._reusable()
        if stamp is not None:
            log.debug("up to date: %s", self.build_dir)
            return self._from_stamp(stamp, self._restore_source() or "up to date: nothing to do")
        substituted = self._substitute()
        if substituted is not None:
            return substituted
        if self.no_build:
            raise BuildError(f"{self.engine} ({self.backend}): no trusted substitute for this build, and --no-build "
                             "forbids compiling" + "".join(f"\n  {line}" for line in self.refusals),
                             hint="Configure [cache] substituters and trusted-public-keys (or PYLMSERV_SUBSTITUTERS, "
                                  "PYLMSERV_TRUSTED_KEYS) and push this build from a builder, or drop --no-build.")
        source = self.prepare()
        self.build_dir.mkdir(parents=True, exist_ok=True)

        with self._build_lock():
            stamp = self._reusable()  # another process may have just finished it
            if stamp is not None:
                return self._from_stamp(stamp, "built by a concurrent run")
            stamps.remove_stamp(self.stamp_path)  # a failed build must not look done
            t0 = time.monotonic()
            done = self.compile(source)
            digests = output_digests(self.select(done.outputs), self.libs_dir())
            stamp = stamps.make_stamp(self.inputs, done.outputs, seconds=time.monotonic() - t0,
                                      extra={"commands": list(done.commands), "source": str(source), **done.extra,
                                             "sha256": digests})
            stamps.write_stamp(self.stamp_path, stamp)
        return self.finish(done.outputs, cache_hit=False, notes=done.notes, source=source, commands=done.commands,
                           sha256=digests)

    def _build_lock(self) -> FileLock:
        """One process builds (or substitutes) this build dir at a time."""
        return FileLock(str(self.build_dir) + ".lock", timeout=LOCK_TIMEOUT)

    def _from_stamp(self, stamp, note: str) -> BuildResult:
        """The result of a build its stamp says is done: nothing compiled."""
        return self.finish(stamp.output_paths(), cache_hit=True, notes=(note,),
                           commands=tuple(stamp.extra.get("commands", ())), sha256=stamp.extra.get("sha256"))

    def _restore_source(self) -> Optional[str]:
        """An up-to-date build whose locked source tree is gone from the store (`verify`
        moved a bad one aside) fetches it back from its pin: the store keeps what the lock
        pins, as docs/security.md promises. One lstat when it is there."""
        entry = getattr(self, "entry", None)
        if entry is None or self.source_dir is not None:
            return None
        path = (layout.blob_path(entry.hash, self.home) if entry.mode == "flat"
                else layout.source_tree_path(entry.hash, entry.name, self.home))
        if os.path.lexists(path):
            return None
        log.warning("%s: the source tree is missing from the store (moved aside by verify?): fetching it again",
                    entry.name)
        from ..store.trees import ensure_source  # lazy for speed: only when the source went missing

        ensure_source(entry, self.home)
        return f"up to date; the source {entry.name}, missing from the store, was fetched again"

    def _substitute(self) -> Optional[BuildResult]:
        """A signed, verified build from a substituter, installed like a compiled one (None:
        none accepted; not tried with --force or for builds that have no cache inputs)."""
        # lazy for speed: the build cache is not on the up-to-date path (builders/__init__.py)
        from .substitute import settings, substitute

        if self.force or not settings(self.cache_config())[0]:
            return None
        inputs = self.cache_inputs()
        if inputs is None:
            return None
        self.build_dir.mkdir(parents=True, exist_ok=True)
        with self._build_lock():
            stamp = self._reusable()  # another process may have just finished it
            if stamp is not None:
                return self._from_stamp(stamp, "built by a concurrent run")
            return substitute(self, inputs, self.cache_config())

    # -- install ---------------------------------------------------------------------------

    def prefix_dir(self) -> Path:
        if self.prefix is not None:
            return self.prefix
        return layout.bin_dir(self.home) / f"{self.engine}-{self.kind}" / self.key

    def bindir(self) -> Path:
        return self.prefix_dir() / "bin" if self.prefix is not None else self.prefix_dir()

    def finish(self, outputs: Dict[str, Path], cache_hit: bool, notes=(), source=None, commands=(),
               sha256=None) -> BuildResult:
        prefix = self.prefix_dir()
        if self.prefix is None:  # the store's bin/<engine>-<backend>/<key>: never through a planted link
            real_dirs(layout.bin_dir(self.home), f"{self.engine}-{self.kind}", self.key)
        installed = install_files(self.select(outputs), self.bindir(), with_libs=self.libs_dir())
        current = point_current(prefix) if self.prefix is None else None
        return BuildResult(self.engine, self.backend, installed, self.build_dir, prefix,
                           time.monotonic() - self.start, cache_hit, self.key, source, tuple(commands), (),
                           tuple(notes), current=current, sha256=dict(sha256 or {}))
