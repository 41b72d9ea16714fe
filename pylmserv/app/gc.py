"""`pylmserv gc`: gather the roots, then let the store sweep what none of them references.

Roots: every lock pylmserv has stored things for on this machine (store/roots: registered
by fetch and build through Project.use_as_gc_root, forgotten once the file is gone), the copies of the locks running pylmserv
processes read, and the `current` build of each engine and backend (store/gc keeps those
itself). A root lock that cannot be read stops gc: it never deletes on a guess.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..builders.cosmocc import toolchain_dir
from ..core.errors import PylmservError
from ..core.hashing import Hash
from ..pins.config import Lock, load_lock
from ..store import gc as sweeper
from ..store import roots
from ..store.blobs import blob_path
from ..store.layout import home as store_home
from ..store.trees import store_path
from ..store.views import rooted_blobs


def root_locks(home: Path, dry_run: bool = False) -> List[Path]:
    """The root locks; a real run also forgets roots whose lock is gone and records of
    processes that ended (a dry run writes and deletes nothing at all)."""
    return (roots.registered_locks(home, forget_missing=not dry_run)
            + roots.live_process_locks(home, cleanup=not dry_run))


def keep_set(locks: List[Lock], home: Path, keep_builds: int) -> sweeper.Keep:
    keep = sweeper.Keep(keep_builds=keep_builds)
    for lock in locks:
        for entry in list(lock.sources.values()) + list(lock.models.values()):
            if entry.mode == "flat":
                keep.paths.add(blob_path(entry.hash, home))
            else:
                keep.paths.add(store_path(entry, home))
            if entry.kind == "sources":
                keep.build_sources.add(entry.hash.sri)
                if entry.mode == "flat":
                    keep.paths.add(toolchain_dir(entry, home))  # an unpacked cosmocc, if it is one
            else:
                keep.models.setdefault(entry.name, set()).add(entry.hash.hex)
    for name, hexes in rooted_blobs(home).items():  # `pylmserv link` views: roots while they exist
        keep.paths.update(blob_path(Hash("sha256", bytes.fromhex(h)), home) for h in hexes)
        keep.models.setdefault(name, set()).update(hexes)
    return keep


def collect(home: Optional[Path] = None, keep_builds: int = 1, dry_run: bool = False) -> sweeper.Report:
    """Delete (or with dry_run, list) what no root references."""
    home = Path(home or store_home())
    if keep_builds < 0:
        raise PylmservError("--keep-builds must be 0 or more", exit_code=2)
    if not home.is_dir():
        return sweeper.Report(home=home, dry_run=dry_run)
    locks = []
    for path in root_locks(home, dry_run):
        try:
            locks.append(load_lock(path, missing_ok=False))
        except PylmservError as exc:
            raise PylmservError(f"gc: cannot read the root lock {path}: {exc.message}",
                                hint="Fix or regenerate that lock (pylmserv prefetch), or delete it; "
                                     "gc deletes nothing while a root is unreadable.", exit_code=2) from None
    return sweeper.sweep(home, keep_set(locks, home, keep_builds), dry_run=dry_run)


def estimate(home: Optional[Path] = None, keep_builds: int = 1):
    """(store size, bytes gc would free, items it would delete) without writing anything
    (no locks taken, no root forgotten): what `doctor` reports."""
    home = Path(home or store_home())
    if not home.is_dir():
        return 0, 0, 0
    paths = roots.registered_locks(home, forget_missing=False) + roots.live_process_locks(home, cleanup=False)
    locks = [load_lock(p, missing_ok=False) for p in paths]
    garbage, _ = sweeper.plan(home, keep_set(locks, home, keep_builds))
    return sweeper.store_size(home), sweeper.freed_bytes(i.path for i, _ in garbage), len(garbage)
