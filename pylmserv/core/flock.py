"""Cross-process locks: flock(2) on a small file kept for the purpose.

An flock dies with the process that holds it, so a killed holder leaves no stale lock
(the file stays, harmlessly). It is the lock the `filelock` package takes on Unix, so a
pylmserv that still used filelock and this one exclude each other on the same file.
Written here rather than imported: filelock cost every fetch ~57 M instructions at its
import (with `logging`, `inspect` and five dataclasses), and it opened the file with
O_TRUNC through whatever link was planted there.

The file is opened never through a link (a link there is not pylmserv's: it is removed as
a link, its target untouched), never truncated, and must be a regular file: a directory,
FIFO or device there is one clean error, not a hang or a traceback."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from .errors import UsageError

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
POLL = 0.05  # seconds between tries while waiting with a timeout (filelock's default too)


class LockTimeout(TimeoutError):
    """The lock was still held by another process when the timeout ran out."""

    def __init__(self, lock_file: str) -> None:
        super().__init__(f"the lock {lock_file} is held by another process")
        self.lock_file = lock_file


class FileLock:
    """An exclusive lock on `path` across processes. `timeout` (seconds; negative: wait as
    long as it takes) is the default for `acquire` and for `with`. Re-entrant per object,
    as filelock's is; two objects on one file exclude each other, even in one process."""

    __slots__ = ("lock_file", "timeout", "_fd", "_depth")

    def __init__(self, path, timeout: float = -1) -> None:
        self.lock_file = os.fspath(path)
        self.timeout = timeout
        self._fd = None
        self._depth = 0

    @property
    def is_locked(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float = None) -> "FileLock":
        if self._fd is not None:
            self._depth += 1
            return self
        timeout = self.timeout if timeout is None else timeout
        fd = _open(self.lock_file)
        try:
            if timeout < 0:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise LockTimeout(self.lock_file) from None
                        time.sleep(min(POLL, left))
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._depth = fd, 1
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth == 0:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor of this open file drops the flock

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _open(path: str) -> int:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISLNK(st.st_mode):
            try:
                os.unlink(path)  # a planted link: removed as a link, its target untouched
            except FileNotFoundError:
                pass  # another pylmserv removed it first
        elif not stat.S_ISREG(st.st_mode):  # looked at first: opening a device can act
            raise _not_a_lock_file(path, "directory" if stat.S_ISDIR(st.st_mode) else "special file")
    try:
        fd = os.open(path, _FLAGS, 0o644)  # O_NOFOLLOW: a link swapped in since is refused (ELOOP)
    except FileNotFoundError:  # its directory is not there (yet, or any more): made, as filelock did
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, _FLAGS, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS) or not os.path.isfile(path):
            raise
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # read-only store
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_lock_file(path, "special file")
    return fd


def _not_a_lock_file(path: str, kind: str) -> UsageError:
    return UsageError(f"{path}: a {kind} is where pylmserv keeps a lock file",
                      hint="It is not pylmserv's: move it away, then run the command again.")
