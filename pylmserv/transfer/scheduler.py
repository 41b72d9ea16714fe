"""The part scheduler: which byte range goes to which connection, and how many.

Parts are handed out in file order (the trailing hasher then keeps pace with the
download) to at most `connections` worker threads. The pool starts with one worker and
doubles while doubling pays (the file's byte rate rises by RAMP_GAIN): on a link where
each connection is capped (a CDN's per-stream limit) it reaches `connections` within a
second; where one connection already fills the link (loopback, a LAN mirror) the extra
workers would only compete for the CPU, so the pool goes back to the last size that paid.
A worker refused by the server (403/429 on a parallel range: Demote) gives its part back
and the pool shrinks for good; the first fatal error of any worker stops all of them.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional

from ..core.errors import Demote
from .partial import Part

MAX_PART_SIZE = 64 << 20
PARTS_PER_CONNECTION = 8  # small parts taken in order: the hash keeps up with the download
RAMP_INTERVAL = 0.2  # seconds of transfer measured before deciding to double the pool
RAMP_GAIN = 1.25  # a doubling must raise the byte rate this much, or the pool goes back
RAMP_SETTLE_MAX = 10.0  # longest wait for new connections' first bytes (TLS, slow first byte)


def new_parts(size: int, connections: int, min_part_size: int) -> List[Part]:
    """Parts of about size/(connections*8), handed out in file order.

    SHA-256 is sequential: with many small parts taken in order, the finished prefix
    of the file grows steadily and the trailing hasher keeps pace, instead of one big
    pass at the end (as with one part per connection)."""
    step = -(-size // (connections * PARTS_PER_CONNECTION))
    step = max(min_part_size, min(MAX_PART_SIZE, step))
    return [Part(a, min(a + step, size)) for a in range(0, size, step)] or [Part(0, 0)]


class PartScheduler:
    def __init__(self, parts: List[Part], connections: int, stop: threading.Event):
        self.parts = parts
        self.allowed = connections  # workers allowed from now on (only ever shrinks)
        self.ramping = False
        self.held = {}  # worker thread -> (first part of its run, that part's bytes when taken)
        self.active = 0  # workers running now
        self.stop = stop
        self.error: Optional[BaseException] = None
        self._lock = threading.Lock()

    def contiguous(self) -> int:
        """Bytes from the start of the file that are all written."""
        n = 0
        for p in self.parts:
            n = p.start + p.done
            if p.remaining:
                break
        return n

    def demote(self) -> bool:
        """A worker was refused: True (it should stop) when others still run."""
        with self._lock:
            if self.active > 1:
                self.active -= 1
                self.allowed = max(1, min(self.allowed, self.active))
                self.ramping = False
                return True
        return False

    def _retire(self) -> bool:
        """Before taking a part: True (the worker stops) when the pool is above its size."""
        with self._lock:
            if self.active > self.allowed:
                self.active -= 1
                return True
        return False

    def done_bytes(self) -> int:
        return sum(p.done for p in self.parts)

    def run(self, fetch_run: Callable[[List[int]], None]) -> None:
        """Run workers over the part queue (runs of consecutive part indices) until every
        part is done or one fails."""
        pending = [i for i, p in enumerate(self.parts) if p.remaining]
        self.ramping = self.allowed > 1
        while pending and self.error is None:
            queue = list(pending)
            qlock = threading.Lock()

            def take() -> Optional[List[int]]:
                """The next run of consecutive parts: a share of what is left, so the pool
                can still grow, and only the first part may be partly done (a resume)."""
                with qlock:
                    if not queue:
                        return None
                    share = max(1, len(queue) // (2 * self.allowed))
                    run = [queue.pop(0)]
                    while (queue and len(run) < share and queue[0] == run[-1] + 1
                           and self.parts[queue[0]].done == 0):
                        run.append(queue.pop(0))
                with self._lock:
                    self.held[threading.get_ident()] = (run[0], self.parts[run[0]].done)
                return run

            def put_back(run: List[int]):
                with qlock:
                    queue[:0] = run

            def worker():
                try:
                    while not self._retire():
                        run = None if self.stop.is_set() else take()
                        if run is None:
                            with self._lock:
                                self.active -= 1
                            return
                        try:
                            fetch_run(run)
                        except Demote:  # demote() has shrunk the pool
                            put_back(run)
                            return
                except BaseException as exc:  # first fatal error stops everyone
                    with self._lock:
                        if self.error is None:
                            self.error = exc
                        self.active -= 1
                    self.stop.set()
                finally:
                    with self._lock:
                        self.held.pop(threading.get_ident(), None)

            threads: List[threading.Thread] = []

            def spawn(n: int) -> None:
                with self._lock:
                    self.active += n
                for _ in range(n):
                    threads.append(threading.Thread(target=worker, daemon=True))
                    threads[-1].start()

            self.active = 0
            spawn(1 if self.ramping else min(self.allowed, len(queue)))
            self._ramp(threads, spawn, queue)
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
            pending = [i for i, p in enumerate(self.parts) if p.remaining]

    def _flowing(self) -> bool:
        """Every worker holds a run and has had a byte of it (or finished it)."""
        with self._lock:
            return len(self.held) >= self.active and all(self.parts[i].done > d0 or not self.parts[i].remaining for i, d0 in self.held.values())

    def _ramp(self, threads: List[threading.Thread], spawn: Callable[[int], None], queue: list) -> None:
        """Double the pool while that raises the byte rate by RAMP_GAIN.

        Each rate is measured over RAMP_INTERVAL once every connection delivers bytes, so
        a new connection's handshake (a TLS round trip, a slow first byte) is not mistaken
        for a doubling that did not pay."""
        paid_size, paid_rate = 0, 0.0
        while self.ramping:
            settle = time.monotonic() + RAMP_SETTLE_MAX
            while not self._flowing() and time.monotonic() < settle:
                if self.stop.wait(0.01) or not any(t.is_alive() for t in threads):
                    return
            before, t0 = self.done_bytes(), time.monotonic()
            if self.stop.wait(RAMP_INTERVAL) or not any(t.is_alive() for t in threads) or not queue:
                return
            rate = (self.done_bytes() - before) / (time.monotonic() - t0)
            with self._lock:
                size = self.active
            if paid_size and rate < paid_rate * RAMP_GAIN:
                with self._lock:  # the last doubling did not pay: back to the size that did
                    self.allowed = paid_size
                self.ramping = False
                return
            paid_size, paid_rate = size, rate
            grow = min(size, self.allowed - size, len(queue))
            if grow <= 0:
                self.ramping = False
                return
            spawn(grow)
