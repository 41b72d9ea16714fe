"""The partial file of a download and its resume state.

dl-<key>.part is preallocated (sparse) at the final size; parts are written at their
offsets. dl-<key>.state.json records URL, ETag, validator, size and each part's progress,
so a killed process resumes only the missing bytes - and only when the server still
proves (same strong validator, same size) that it is the same file.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import List, Optional

from ..core.errors import DiskSpaceError
from ..core.fsutil import read_state_text, start_writeback, unlink_missing_ok
from ..core.log import get_logger
from .http import file_name

log = get_logger("pylmserv.download")

STATE_VERSION = 1
STATE_INTERVAL = 0.25  # seconds between sidecar state saves (bounds what a kill re-sends)
STATE_EVERY = 0.01  # ... or this fraction of the file, whichever comes first
WRITEBACK_EVERY = 8 << 20  # new bytes between write-behind steps for the partial (see ResumeState._syncer)


class Part:
    __slots__ = ("start", "end", "done")

    def __init__(self, start: int, end: int, done: int = 0):
        self.start, self.end, self.done = start, end, done  # end is exclusive

    @property
    def remaining(self) -> int:
        return self.end - self.start - self.done


def create_fresh(path: Path, flags: int) -> int:
    """A new file at `path` (fd, mode 0644): whatever is at that predictable name - a stale
    file, a symlink or a hard link planted there - is unlinked first (only the name goes,
    never what it points at), then O_CREAT|O_EXCL|O_NOFOLLOW: nothing is ever written
    through a name in tmp/ into a file outside the home."""
    unlink_missing_ok(path)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)


class PartialFile:
    def __init__(self, base: Path, url: str):
        self.path = Path(str(base) + ".part")
        self.state_path = Path(str(base) + ".state.json")
        self.url = url

    def discard(self) -> None:
        unlink_missing_ok(self.state_path)
        unlink_missing_ok(self.path)

    def open_fresh(self):
        """The partial, created anew for a single stream (see create_fresh)."""
        return os.fdopen(create_fresh(self.path, os.O_WRONLY), "wb")

    def cleanup_state(self) -> None:
        unlink_missing_ok(self.state_path)

    def save_state(self, snapshot: List[List[int]], size: int, etag: Optional[str],
                   validator: Optional[str]) -> None:
        """Record part progress: temp file + rename, so a reader never sees half a state.

        Not fsynced, on purpose: the page cache outlives a killed process, which is what
        resume is for; after a power cut a stale or zero-filled part only costs a
        re-download, because the whole file is hashed before it is installed."""
        data = {"version": STATE_VERSION, "url": self.url, "etag": etag,
                "validator": validator, "size": size, "parts": snapshot}
        tmp = self.state_path.with_name(f"{self.state_path.name}.{os.getpid()}.tmp")
        try:
            with os.fdopen(create_fresh(tmp, os.O_WRONLY), "w") as f:
                f.write(json.dumps(data))
            os.replace(tmp, self.state_path)
        except OSError:
            unlink_missing_ok(tmp)  # the previous state stays valid: it only undercounts
            raise

    def load_state(self, size: Optional[int], etag: Optional[str], validator: Optional[str]) -> Optional[List[Part]]:
        """The saved parts when they are of this very file, else None (the partial is dropped)."""
        try:
            data = json.loads(read_state_text(self.state_path))
            st = os.lstat(self.path)  # a link is no partial of ours: never written through
        except (OSError, ValueError):
            self.discard()
            return None
        if not stat.S_ISREG(st.st_mode):
            self.discard()  # unlinks the link itself, never what it points at
            return None
        ok = (isinstance(data, dict) and data.get("version") == STATE_VERSION and data.get("url") == self.url
              and data.get("size") == size and st.st_size == size
              and data.get("etag") == etag and data.get("validator") == validator
              and validator)  # no strong validator: no proof it is the same file, start over
        if not ok:
            log.info("discarding a partial download of %s: the file changed or the state is stale",
                     file_name(self.url))
            self.discard()
            return None
        try:
            parts = [Part(int(a), int(b), int(d)) for a, b, d in data["parts"]]
        except (KeyError, TypeError, ValueError):
            self.discard()
            return None
        if not parts or any(not (0 <= p.done <= p.end - p.start) for p in parts) or parts[-1].end != size:
            self.discard()
            return None
        return parts

    def preallocate(self, size: int) -> None:
        """Create the partial at its final size, sparse.

        Not posix_fallocate: on ext4 every write into fallocated (unwritten) extents
        pays an extent conversion, measured 10x slower here. Free space is checked up
        front instead, and ENOSPC while writing keeps the partial for resume."""
        fd = create_fresh(self.path, os.O_RDWR)
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                raise DiskSpaceError(f"cannot create a {size}-byte file in {self.path.parent}: {exc.strerror}",
                                     hint="Free some space or point PYLMSERV_HOME at a larger disk.") from None
            raise
        finally:
            os.close(fd)

    def check_space(self, need: int) -> None:
        try:
            st = os.statvfs(self.path.parent)  # what shutil.disk_usage reads, without its import
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if need and free < need:
            raise DiskSpaceError(f"not enough free space in {self.path.parent}: {need} bytes needed, {free} free",
                                 hint="Free some space or point PYLMSERV_HOME at a larger disk.")


class ResumeState:
    """The persisted side of a ranged download: the partial file at its final size, each
    part's progress, and the sidecar that records it.

    While the run goes on, one thread saves the state about four times a second (so a
    kill re-sends little) and another writes the bytes that landed to disk as they come
    (write-behind), so the fsync before the install has little left. The run only moves `Part.done` forward, after the
    bytes are written; everything about the disk is here."""

    def __init__(self, file: PartialFile, min_part_size: int):
        self.file = file
        self.min_part_size = max(1, min_part_size)
        self.parts: List[Part] = []
        self.size = 0
        self.etag: Optional[str] = None
        self.validator: Optional[str] = None
        self.resumed = False
        self._threads: List[threading.Thread] = []
        self._stop = threading.Event()
        self.fd: Optional[int] = None

    def open(self, size: int, etag: Optional[str], validator: Optional[str], fresh_parts) -> List[Part]:
        """The parts of this very file saved by an earlier run, else new ones from
        `fresh_parts(size)` with the partial created (space checked) and the state saved."""
        self.size, self.etag, self.validator = size, etag, validator
        parts = self.file.load_state(size, etag, validator)
        self.resumed = parts is not None
        if parts is None:
            parts = fresh_parts(size)
            self.file.check_space(size)
            self.file.preallocate(size)
            self.parts = parts
            try:
                self.save()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                self.file.discard()
                raise DiskSpaceError(f"no space left on device in {self.file.path.parent}",
                                     hint="Free some space and run the command again.") from None
        self.parts = parts
        self.fd = os.open(self.file.path, os.O_RDWR | os.O_NOFOLLOW)  # checked regular above, never a link
        return parts

    def done(self) -> int:
        return sum(p.done for p in self.parts)

    def save(self) -> None:
        snapshot = [[p.start, p.end, p.done] for p in self.parts]  # only bytes already written
        self.file.save_state(snapshot, self.size, self.etag, self.validator)

    def start(self) -> None:
        """Save the state and flush finished bytes in the background until close()."""
        self._stop.clear()
        self._threads = [threading.Thread(target=self._saver, daemon=True),
                         threading.Thread(target=self._syncer, daemon=True)]
        for t in self._threads:
            t.start()

    def close(self, keep: bool) -> None:
        """Stop the background threads; with `keep`, record the progress for a resume."""
        self._stop.set()
        for t, wait in zip(self._threads, (5, 30)):
            t.join(wait)
        if keep and self.file.path.exists() and any(p.remaining for p in self.parts):
            try:
                self.save()
            except OSError as exc:  # e.g. the disk is full: the last saved state still holds
                log.warning("could not update the resume state of %s: %s", file_name(self.file.url), exc.strerror)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _saver(self) -> None:
        last_time, last_bytes = time.monotonic(), -1
        every = max(self.min_part_size, int(self.size * STATE_EVERY))
        while not self._stop.wait(0.05):
            done = self.done()
            now = time.monotonic()
            if done != last_bytes and (now - last_time >= STATE_INTERVAL or done - last_bytes >= every):
                try:
                    self.save()
                except OSError:
                    pass
                last_time, last_bytes = now, done

    def _syncer(self) -> None:
        """Write-behind: every WRITEBACK_EVERY new bytes, start the disk writing what
        landed (start_writeback, not waiting) and make it durable (fdatasync, on this
        thread, so no connection waits for it). The disk then works while the network
        does, and the fsync before the install finds little left: on a VM whose disk
        flush is the costly part, incremental fdatasyncs spread it over the download,
        which start_writeback alone does not. The final fsync stays: this only moves
        writeback earlier, never replaces it."""
        written = 0
        while not self._stop.wait(0.02):
            done = self.done()
            if done - written >= WRITEBACK_EVERY:
                start_writeback(self.fd)
                try:
                    os.fdatasync(self.fd)
                except OSError:
                    return
                written = done
