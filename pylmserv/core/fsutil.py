"""Atomic file writes (temp file in the same directory, fsync, os.replace); the size of a
tree on disk, and how a size is shown."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator, Union

from .errors import UsageError


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


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait
_sync_file_range = None  # libc's sync_file_range, looked up on first use; False where there is none


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> bool:
    """Ask the kernel to start writing the file's dirty pages in [offset, offset+nbytes)
    (nbytes 0: to the end) to disk now, without waiting for them (Linux sync_file_range
    with SYNC_FILE_RANGE_WRITE). A write-behind hint, never a durability guarantee: a
    file must still be fsynced before it is trusted; the fsync then has little left to
    write. False where the call is not available (other systems); errors are ignored."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        try:
            import ctypes  # only here: a download's background thread pays for it, no command's start

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sync_file_range = fn
        except (ImportError, OSError, AttributeError):
            pass
    if not _sync_file_range:
        return False
    return _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0


def unlink_missing_ok(path: Union[str, Path]) -> None:
    """Remove a file; one that is already gone is fine (cleanup after a failure)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_no_follow(path: Union[str, Path]) -> None:
    """Delete `path` and, when it is a real directory, everything below it, without ever
    following a symlink: a link is removed as a link (its target is untouched), and no
    directory is entered through one. The one way every pylmserv deleter removes a tree.

    shutil.rmtree on Linux works on directory file descriptors (openat/unlinkat with
    O_NOFOLLOW: `rmtree.avoids_symlink_attacks`), so a link swapped in while it runs is
    not followed either. Read-only directories inside (a build's, an unpacked archive's)
    are made writable first; only real directories are chmod'ed, never a link's target.
    Already gone is fine."""
    import stat as _stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not _stat.S_ISDIR(st.st_mode):  # a file, a link (to anything), a fifo: one unlink
        unlink_missing_ok(path)
        return
    import shutil  # only for a tree: most calls remove one file, or nothing (~8 M instructions)

    def onerror(func, p, exc_info):
        if isinstance(exc_info[1], FileNotFoundError):
            return
        parent = os.path.dirname(p)
        for d in (parent, p):
            try:
                if _stat.S_ISDIR(os.lstat(d).st_mode):
                    os.chmod(d, 0o700, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass
        if func in (os.rmdir, os.unlink, os.remove):
            try:
                func(p)
            except FileNotFoundError:
                pass
            return
        # os.open / os.scandir failed on an unreadable directory: now readable, go again below it
        if _stat.S_ISDIR(os.lstat(p).st_mode):
            shutil.rmtree(p, onerror=onerror)

    if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover (no openat: macOS, Windows)
        _remove_walk(Path(path))
        return
    try:
        shutil.rmtree(path, onerror=onerror)
    except RecursionError:  # Python < 3.12 recurses per level: a tree 1,000 deep goes on iteratively
        _remove_walk(Path(path))


STATE_LIMIT = 16 << 20  # bytes: a state file pylmserv writes (record, manifest, stamp) is far smaller


def read_regular_bytes(path: Union[str, Path], limit: int, follow: bool = True) -> bytes:
    """The bytes of a regular file, read so that a FIFO or a device in its place cannot hang
    or exhaust a command: O_NONBLOCK, then fstat (a regular file only: EINVAL otherwise), at
    most `limit` bytes (EFBIG otherwise). `follow=False`: never through a link (ELOOP)."""
    import errno
    import stat as _stat

    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        chunks, left = [], limit + 1
        while left > 0:
            data = os.read(fd, min(left, 1 << 20))
            if not data:
                break
            chunks.append(data)
            left -= len(data)
        if left <= 0:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_state_text(path: Union[str, Path], limit: int = STATE_LIMIT) -> str:
    """The text of a small state file pylmserv wrote in its home (a gc-root record, a
    manifest, a stamp, verify's record, a resume state), read so that an edited or planted
    one cannot hang or exhaust a command: never through a link (O_NOFOLLOW), never a FIFO
    or device, at most `limit` bytes, strict UTF-8. Raises OSError (or UnicodeDecodeError,
    a ValueError) for anything else: callers treat it as a missing or unreadable record."""
    return read_regular_bytes(path, limit, follow=False).decode("utf-8")


def walk_no_follow(top: Union[str, Path]):
    """os.walk(top) without following links and without recursion (os.walk in Python < 3.12
    recurses once per level, so a hostile tree 1,000 levels deep raised RecursionError):
    (dirpath, dirnames, filenames), top-down; links are listed among the filenames."""
    stack = [str(top)]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        dirs, files = [], []
        for e in entries:
            try:
                (dirs if e.is_dir(follow_symlinks=False) else files).append(e.name)
            except OSError:
                files.append(e.name)
        yield d, dirs, files
        stack.extend(os.path.join(d, name) for name in reversed(dirs))


def copy_tree_no_follow(src: Union[str, Path], dst: Union[str, Path], skip_names=(), writable: bool = False) -> None:
    """shutil.copytree(src, dst, symlinks=True) without recursion (a tree 1,000 levels deep
    is fine) and without opening anything but regular files: links are copied as links,
    a FIFO, socket or device is refused (opening a FIFO would block forever). Names in
    `skip_names` are left out at every level. `writable`: directories 0755 and files with
    the owner's write bit (a writable copy of a read-only store tree). `dst` must not exist."""
    import shutil
    import stat as _stat

    skip = frozenset(skip_names)
    os.mkdir(dst)
    stack = [(str(src), str(dst))]
    dirs_done = []
    while stack:
        s, d = stack.pop()
        for entry in sorted(os.scandir(s), key=lambda e: e.name):
            if entry.name in skip:
                continue
            target = os.path.join(d, entry.name)
            st = entry.stat(follow_symlinks=False)
            if _stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(entry.path), target)
            elif _stat.S_ISDIR(st.st_mode):
                os.mkdir(target)
                stack.append((entry.path, target))
            elif _stat.S_ISREG(st.st_mode):
                shutil.copy2(entry.path, target, follow_symlinks=False)
                if writable:
                    os.chmod(target, _stat.S_IMODE(st.st_mode) | 0o200)
            else:
                raise UsageError(f"{entry.path}: not a regular file, directory or link (a FIFO, socket or device); "
                                 "it cannot be copied", hint="Remove it from the source tree.")
        dirs_done.append((s, d))
    for s, d in reversed(dirs_done):  # after their contents: a read-only directory is filled first
        shutil.copystat(s, d, follow_symlinks=False)
        if writable:
            os.chmod(d, 0o755)


@contextlib.contextmanager
def temp_dir(prefix: str = "pylmserv.", dir: Union[str, Path, None] = None) -> Iterator[Path]:
    """tempfile.TemporaryDirectory, removed by remove_no_follow (no links followed, no
    recursion limit: what an archive unpacked into it holds may be 1,000 levels deep)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    try:
        yield path
    finally:
        remove_no_follow(path)


def _remove_walk(path: Path) -> None:
    """remove_no_follow without fd-relative calls: lstat each entry, unlink what is not a
    real directory, recurse (iteratively) into real directories only."""

    stack = [(path, False)]
    while stack:
        d, emptied = stack.pop()
        if emptied:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            continue
        stack.append((d, True))
        if not os.access(d, os.R_OK | os.W_OK | os.X_OK):  # a read-only directory (d is no link)
            try:
                os.chmod(d, 0o700)
            except OSError:
                pass
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), False))
            else:
                unlink_missing_ok(entry.path)


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


def tree_stats(path: Union[str, Path]) -> Iterator[os.stat_result]:
    """lstat of every file (and symlink) at or under `path`; never follows a link, skips
    what vanishes or cannot be read."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        yield st
        return
    for dirpath, dirnames, filenames in walk_no_follow(path):
        for name in filenames:  # links (to directories too) are among the files: never entered
            try:
                yield os.lstat(os.path.join(dirpath, name))
            except OSError:
                pass


def tree_size(path: Union[str, Path]) -> int:
    """Bytes of the files (and links) at or under `path` (a link counts as itself)."""
    return sum(st.st_size for st in tree_stats(path))


def human_size(n: float) -> str:
    """1536 -> "1.5 KiB" (binary units; bytes without a decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
