"""Atomic file writes: temp file in the same directory, fsync, os.replace."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def atomic_write_bytes(path: Union[str, Path], data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Readers see the old file or the new one, never a torn one. durable=False skips the
    fsyncs: for caches and per-process copies, where a crash may lose the write (no harm)
    and the cost would land on a fast path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        unlink_missing_ok(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def _create_temp(directory: Path, name: str):
    """(fd, path) of a new file `.NAME.<random>.tmp` in `directory`, as tempfile.mkstemp
    makes it (O_EXCL, mode 0600, never through a link), without importing tempfile (with
    shutil and random: ~5 ms on every up-to-date `build`, which writes its gc root)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {directory}")


def atomic_write_text(path: Union[str, Path], text: str, mode: int = 0o644, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode, durable)


def fsync_dir(path: Union[str, Path]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unlink_missing_ok(path: Union[str, Path]) -> None:
    """Remove a file; one that is already gone is fine (cleanup after a failure)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- temp files stamped with their writer, so a later run can clear a killed one's -----

def process_stamp(pid: int = 0) -> str:
    """`<pid>-<start time>` of a process (default: this one). The start time (clock ticks
    after boot, /proc/<pid>/stat) tells a reused pid apart; '' when the process is gone."""
    pid = pid or os.getpid()
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return f"{pid}-{int(fields[19])}"
    except (OSError, IndexError, ValueError):
        if pid == os.getpid():
            return f"{pid}-0"  # no /proc: pids alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            pass
        return f"{pid}-0"


def stamped_name(prefix: str, suffix: str) -> str:
    """A temp file name that says which process writes it: prefix + stamp + suffix."""
    return f"{prefix}pylmserv-{process_stamp()}{suffix}"


def remove_stale(directory: Union[str, Path], prefix: str, suffix: str) -> list:
    """Delete files named by stamped_name(prefix, suffix) whose writer is dead (killed
    before it could clean up); a live writer's file is left alone. Returns what went."""
    import re

    removed = []
    pattern = re.compile(re.escape(prefix) + r"pylmserv-(\d+)-(\d+)" + re.escape(suffix) + r"\Z")
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        pid, start = int(m.group(1)), m.group(2)
        now = process_stamp(pid)
        if now and (now == f"{pid}-{start}" or now.endswith("-0")):
            continue  # its writer is alive (or cannot be told apart): not ours to delete
        path = Path(directory) / name
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink()
                removed.append(path)
        except OSError:
            pass
    return removed
