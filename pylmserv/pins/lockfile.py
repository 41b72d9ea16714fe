"""The one way to change pylmserv.lock: read, merge, write, under one file lock.

`pylmserv prefetch` and `fetch --trust-on-first-use` both go through `update`, so
parallel runs that pin different names all land (each re-reads the lock after taking
the file lock and merges its own pins into what it finds). The write is atomic and
happens only when the text changes (or the lock is an older version, to upgrade it).
The file lock lives in the store's tmp/ (the lock itself is replaced on every write, so
it cannot carry the lock; and the project directory stays clean).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional, Tuple

from ..core.errors import PylmservError, UsageError
from ..core.flock import FileLock, LockTimeout
from ..store.layout import subdir
from .config import is_packaged, packaged_dir
from .lock import Lock, load_lock

WAIT = 600  # seconds to wait for another pylmserv writing the same lock


def refuse_packaged(path: Optional[Path]) -> None:
    if is_packaged(path):
        raise UsageError(f"refusing to write the packaged default lock {path} (the packaged catalog is read-only)",
                         hint="Create a local pylmserv.toml (e.g. copy the packaged one: "
                              f"cp {packaged_dir() / 'pylmserv.toml'} .) and run `pylmserv prefetch` there, "
                              "or pass --config/--lock.")


def _file_lock(path: Path) -> FileLock:
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    try:
        tmp = subdir("tmp")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: the file lock's directory (the store's tmp/) is not writable: "
                         f"{exc.strerror or exc}", hint="Set PYLMSERV_HOME to a writable directory.") from None
    return FileLock(tmp / f"lockfile-{key}.lock", timeout=WAIT)


def update(path: Path, change: Callable[[Lock], Lock]) -> Tuple[Lock, Lock, bool]:
    """Apply `change` to the lock at `path` as it is now, under the file lock; write the
    result if it differs. Returns (the lock as found, the lock as left, written)."""
    path = Path(path)
    refuse_packaged(path)
    lock = _file_lock(path)
    try:
        lock.acquire()
    except LockTimeout:
        raise PylmservError(f"another pylmserv process has held the lock of {path} for {WAIT}s",
                            hint=f"Wait for it, or stop it (and delete {lock.lock_file}).") from None
    try:
        before = load_lock(path)
        after = change(before)
        old_text = path.read_text(encoding="utf-8") if path.exists() else None
        if old_text is not None and old_text == after.to_toml():
            return before, after, False
        after.write(path)
        return before, after, True
    finally:
        lock.release()
