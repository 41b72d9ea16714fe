"""GC roots: which locks keep things in the store alive (as Nix's gcroots do).

  gcroots/locks/<key>            the absolute path of a lock pylmserv used on this machine
                                 (forgotten by `gc` once that file is gone)
  gcroots/procs/<pid>-<r>.flock  held (flock) by a running pylmserv for its whole life;
  gcroots/procs/<pid>-<r>/       copies of the locks that process read, as it read them,
                                 so a running `serve` keeps its model even after the lock
                                 on disk moved on; the process removes both when it ends
                                 (a killed one's flock is free: gc drops it)

Registration never fails a command: a read-only or full store only loses the root. Nor
does it create the store: while there is none, the root waits in memory and is written
when this process creates the store (layout.on_home_ready), i.e. before it stores anything.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..core.flock import FileLock, LockTimeout
from ..core.fsutil import atomic_write_bytes, atomic_write_text, read_state_text, remove_no_follow, unlink_missing_ok
from ..core.log import get_logger
from .layout import home as store_home
from .layout import on_home_ready

log = get_logger("pylmserv.store")

ROOTS = "gcroots"
PATH_LIMIT = 1 << 16  # bytes: a record holds one path (PATH_MAX is 4096)
_held: Dict[str, Tuple[FileLock, Path]] = {}  # home -> (the flock held by this process, its directory)
_pending: Dict[Tuple[str, str], bytes] = {}  # (home, lock path) -> lock text, until the store exists


def _key(path: Path) -> str:
    return hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def roots_dir(home: Optional[Path] = None) -> Path:
    return Path(home or store_home()) / ROOTS


def use_lock(lock_path: Path, home: Optional[Path] = None) -> None:
    """Record that this process uses the lock at `lock_path` (a persistent root, and this
    process's own copy of the lock as read now)."""
    try:
        path = Path(lock_path).resolve()
        text = path.read_bytes()
    except OSError:
        return
    base = Path(home or store_home())
    if not base.is_dir():  # reading commands never create the store
        _pending[(str(base), str(path))] = text
        return
    _record(path, text, base)


def _record(path: Path, text: bytes, home: Path) -> None:
    try:
        register_lock(path, home)
        _hold(path, text, home)
    except OSError as exc:
        log.debug("gc root for %s not recorded: %s", path, exc)


def _flush(home: Path) -> None:
    """The store now exists: write the roots that waited for it."""
    if not _pending:
        return
    for (base, path), text in list(_pending.items()):
        if Path(base) == Path(home):
            del _pending[(base, path)]
            _record(Path(path), text, Path(home))


on_home_ready(_flush)


def register_lock(lock_path: Path, home: Optional[Path] = None) -> Path:
    path = Path(lock_path).resolve()
    entry = roots_dir(home) / "locks" / _key(path)
    try:
        if read_state_text(entry) == str(path):
            return entry
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        remove_no_follow(entry)  # a link, FIFO or garbage at our own record: not ours, replaced
    entry.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(entry, str(path))
    return entry


def _hold(lock_path: Path, text: bytes, home: Optional[Path]) -> None:
    base = roots_dir(home) / "procs"
    key = str(Path(home or store_home()).resolve())
    if key not in _held:
        base.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{os.urandom(4).hex()}"
        flock = FileLock(base / f"{name}.flock").acquire(timeout=0)  # a fresh name: never contended
        _held[key] = (flock, base / name)
        if len(_held) == 1:
            import atexit

            atexit.register(release_all)
    directory = _held[key][1]
    # Not durable: the copy lives only as long as this process.
    atomic_write_bytes(directory / f"{_key(lock_path)}.lock", text, durable=False)


def release_all() -> None:
    """Remove this process's own records (at exit): its lock copies, then its flock file.
    A process killed before it could does not matter: its flock is free, and gc drops it."""
    while _held:
        key, (flock, directory) = _held.popitem()
        try:
            _remove_flat(directory)
            unlink_missing_ok(Path(str(directory) + ".flock"))
        except OSError:
            pass
        finally:
            flock.release()


def _remove_flat(directory: Path) -> None:
    """Remove this process's own directory of lock copies (flat: files only). It is opened
    without following a link, its entries unlinked through that descriptor (a link as a
    link) and the directory removed; anything else (a link or file in its place, a
    directory planted in it) goes to remove_no_follow, which never follows a link either.
    Not remove_no_follow first: its shutil import costs every `pylmserv` run ~7 M
    instructions at exit (the up-to-date `build` budget)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError:  # a link or a file where the directory was: not entered
        remove_no_follow(directory)
        return
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        if any(is_dir for _, is_dir in entries):
            entries = None
        else:
            for name, _ in entries:
                try:
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass
    finally:
        os.close(fd)
    try:
        if entries is None:
            raise OSError("not flat")
        os.rmdir(directory)
    except FileNotFoundError:
        pass
    except OSError:  # a directory inside, filled again meanwhile, or swapped: the careful deleter
        remove_no_follow(directory)


def registered_locks(home: Optional[Path] = None, forget_missing: bool = True) -> List[Path]:
    """Locks registered as roots whose file still exists (the others are forgotten)."""
    base = roots_dir(home) / "locks"
    out = []
    for entry in sorted(base.glob("*")) if base.is_dir() else []:
        try:  # never a FIFO or a link to /dev/zero (a hang, a read without end)
            text = read_state_text(entry, limit=PATH_LIMIT)
            path = Path(text)
            usable = path.is_absolute() and "\0" not in text  # pylmserv writes absolute paths only
            present = usable and path.is_file()
        except (OSError, ValueError):  # not a record pylmserv wrote
            usable = present = False
        if present:
            out.append(path)
        elif forget_missing:
            remove_no_follow(entry)  # a link is removed as a link
    return out


def live_process_locks(home: Optional[Path] = None, cleanup: bool = True) -> List[Path]:
    """Lock copies held by running pylmserv processes (this one excluded: its roots are the
    registered ones). Records of dead processes are removed when `cleanup`."""
    import stat

    base = roots_dir(home) / "procs"
    out: List[Path] = []
    mine = {str(d) for _, d in _held.values()}
    for flock_path in sorted(base.glob("*.flock")) if base.is_dir() else []:
        directory = flock_path.with_suffix("")
        if str(directory) in mine:
            continue
        try:
            regular = stat.S_ISREG(os.lstat(flock_path).st_mode)
        except OSError:
            continue
        if not regular:  # not a record pylmserv writes (a link would be opened through)
            if cleanup:
                remove_no_follow(flock_path)
            continue
        probe = FileLock(str(flock_path))
        try:
            probe.acquire(timeout=0)
        except LockTimeout:
            out.extend(sorted(directory.glob("*.lock")))  # alive: its locks are roots
            continue
        try:
            if cleanup:
                try:
                    remove_no_follow(directory)
                    unlink_missing_ok(flock_path)
                except OSError:
                    pass  # a read-only store: the record stays, still ignored
        finally:
            probe.release()
    return out
