"""The trailing hasher: SHA-256 of a file in order while its parts land out of order."""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Callable

from ..core.hashing import Hash


class TrailingHasher:
    """SHA-256 of the file in order, while parts land.

    A chunk that arrives exactly at the hash frontier is hashed from memory by the
    connection that received it (offer); the rest of the finished prefix is read back
    from the page cache by this thread as the frontier reaches it."""

    def __init__(self, fd: int, contiguous: Callable[[], int], cond: threading.Condition):
        self.fd = fd
        self.contiguous = contiguous
        self.cond = cond
        self.h = hashlib.sha256()
        self.pos = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self.thread.start()

    def offer(self, offset: int, chunk: bytes) -> None:
        if not self.lock.acquire(blocking=False):
            return  # the thread is hashing; it will read this chunk back instead
        try:
            if self.pos == offset:
                self.h.update(chunk)
                self.pos += len(chunk)
        finally:
            self.lock.release()

    def _loop(self):
        while not self._stop.is_set():
            with self.cond:
                target = self.contiguous()
                if target <= self.pos:
                    self.cond.wait(0.2)
                    continue
            self._advance(min(target, self.pos + (8 << 20)))

    def _advance(self, target: int) -> None:
        while True:
            with self.lock:
                if self.pos >= target:
                    return
                data = os.pread(self.fd, min(1 << 20, target - self.pos), self.pos)
                if not data:
                    raise OSError(f"partial file shorter than expected at {self.pos}")
                self.h.update(data)
                self.pos += len(data)

    def stop(self):
        self._stop.set()
        with self.cond:
            self.cond.notify_all()  # wake the thread now, not at its next timeout
        if self.thread.is_alive():
            self.thread.join(5)

    def finish(self, size: int) -> None:
        self.stop()
        self._advance(size)

    def result(self) -> Hash:
        return Hash.from_hashlib(self.h)
