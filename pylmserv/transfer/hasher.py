"""The trailing hasher: SHA-256 of a file in order while its parts land out of order."""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Callable, Dict

from ..core.hashing import Hash

WINDOW = 8 << 20  # bytes ahead of the hash frontier whose chunks are kept in memory


class TrailingHasher:
    """SHA-256 of the file in order, on its own thread, while parts land.

    Connections hand over the chunks they receive near the hash frontier (offer), so the
    hash runs from memory on another core while the next bytes arrive; a chunk that was
    not handed over (too far ahead, or the window was full) is read back from the page
    cache when the frontier reaches it. Memory stays bounded by WINDOW, whatever the size."""

    def __init__(self, fd: int, contiguous: Callable[[], int], cond: threading.Condition):
        self.fd = fd
        self.contiguous = contiguous
        self.cond = cond
        self.h = hashlib.sha256()
        self.pos = 0
        self.lock = threading.Lock()  # one hasher at a time (the thread, or finish())
        self.qlock = threading.Lock()
        self.queue: Dict[int, bytes] = {}  # offset -> chunk, only within WINDOW of pos
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self.thread.start()

    def offer(self, offset: int, chunk: bytes) -> None:
        """A chunk written at `offset`; call it before the chunk counts as done."""
        with self.qlock:
            if self.pos <= offset and offset + len(chunk) <= self.pos + WINDOW:
                self.queue[offset] = chunk

    def _loop(self):
        while not self._stop.is_set():
            with self.cond:
                target = self.contiguous()
                if target <= self.pos:
                    self.cond.wait(0.2)
                    continue
            self._advance(target)

    def _advance(self, target: int) -> None:
        with self.lock:
            while self.pos < target:
                with self.qlock:
                    data = self.queue.pop(self.pos, None)
                    if data is None:
                        # read back up to the next chunk in memory (or 1 MiB)
                        ahead = [o for o in self.queue if o > self.pos]
                        stop = min([target, self.pos + (1 << 20)] + ahead)
                if data is None:
                    data = os.pread(self.fd, stop - self.pos, self.pos)
                    if not data:
                        raise OSError(f"partial file shorter than expected at {self.pos}")
                self.h.update(data)
                with self.qlock:
                    self.pos += len(data)
                    for o in [o for o in self.queue if o < self.pos]:
                        del self.queue[o]  # a chunk of bytes already hashed (a retried range)

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
