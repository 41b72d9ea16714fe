"""The part scheduler: which byte range goes to which connection, and how many.

Parts are handed out in file order (the trailing hasher then keeps pace with the
download) to at most `connections` worker threads. The pool starts with one worker and
doubles while doubling pays (the file's byte rate rises by RAMP_GAIN): on a link where
each connection is capped (a CDN's per-stream limit) it reaches `connections` within a
second; where one connection already fills the link (a LAN mirror) the extra workers
would only compete for the CPU, so the pool goes back to the last size that paid. Where
the connections keep this process busy (RAMP_BUSY of their time on a CPU or waiting for
one, as on a fast local link or a loaded machine), the bottleneck is this machine, not
the link: the pool is not grown at all, so the default is never slower than one
connection there. The decision is ramp_step(), a pure function of what was measured.
A worker refused by the server (403/429 on a parallel range: Demote) gives its part back
and the pool shrinks for good; the first fatal error of any worker stops all of them.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional

from ..core.errors import Demote
from ..core.record import Record, hash_by_value
from .partial import Part

MAX_PART_SIZE = 64 << 20
PARTS_PER_CONNECTION = 8  # small parts taken in order: the hash keeps up with the download
RAMP_INTERVAL = 0.2  # seconds of transfer measured before deciding to double the pool
RAMP_WARMUP = 0.1  # seconds after new connections flow before their rate is measured
RAMP_GAIN = 1.25  # a doubling must raise the byte rate this much, or the pool goes back
RAMP_SETTLE_MAX = 10.0  # longest wait for new connections' first bytes (TLS, slow first byte)
RAMP_BUSY = 0.5  # connections on (or waiting for) the CPU this share of the time: this machine is the bottleneck


def _thread_busy_seconds(tid: int) -> Optional[float]:
    """Seconds a thread has run on a CPU or waited in the run queue for one (Linux's
    schedstat); None where that is not available."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            run, wait = f.read().split()[:2]
        return (int(run) + int(wait)) / 1e9
    except (OSError, ValueError):
        return None


class Sample(Record):  # a Record, not a dataclass: `fetch` imports this module (~4 M instructions a dataclass)
    """What the ramp measured over one interval with `size` workers."""

    __slots__ = ("size", "rate", "busy")
    size: int
    rate: float  # bytes of the file per second, all workers together
    busy: float  # the workers' time on or waiting for a CPU / (interval x size): 1.0 = never waiting on the link

    __hash__ = hash_by_value


def ramp_step(now: Sample, paid: Optional[Sample], allowed: int, queued: int) -> int:
    """The ramp's decision after measuring `now`: how many workers to add (> 0), or the
    pool's final size (<= 0: -n means "settle at n workers").

    `paid` is the last size whose doubling paid (None at the start); `allowed` the most
    workers allowed; `queued` the runs of parts still waiting."""
    if paid is not None and now.rate < paid.rate * RAMP_GAIN:
        return -paid.size  # the last doubling did not pay: back to the size that did
    if now.busy >= RAMP_BUSY:
        return -now.size  # the CPU, not the link, limits: more connections would compete for it
    grow = min(now.size, allowed - now.size, queued)
    return grow if grow > 0 else -now.size


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
        self.cpu: Dict[int, float] = {}  # worker thread -> its CPU seconds when it last noted them
        self.tids: Dict[int, int] = {}  # worker thread -> its native (kernel) thread id
        self.samples: List[Sample] = []  # what the ramp measured, in order
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

    def note_chunk(self) -> None:
        """Called by a worker for each chunk it receives: who it is and its CPU time, for
        the ramp's busy measure."""
        me = threading.get_ident()
        self.cpu[me] = time.thread_time()
        self.tids[me] = threading.get_native_id()

    def busy_seconds(self) -> Dict[int, float]:
        """Per worker: seconds on or waiting for a CPU (a thread kept waiting by a loaded
        machine wants the CPU, not the link); its CPU time where the kernel does not say."""
        snap = {}
        for me, tid in list(self.tids.items()):  # list(): one C call, safe while workers note
            seconds = _thread_busy_seconds(tid)
            snap[me] = seconds if seconds is not None else self.cpu.get(me, 0.0)
        return snap

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
        """Double the pool while that raises the byte rate by RAMP_GAIN and the workers
        spend most of their time waiting on the link.

        Each rate is measured over RAMP_INTERVAL once every connection delivers bytes and
        RAMP_WARMUP after that, so a new connection's handshake (a TLS round trip, a slow
        first byte) is not mistaken for a doubling that did not pay, nor the burst a server
        pushes into a fresh socket before pacing it for one that did."""
        paid: Optional[Sample] = None
        while self.ramping:
            settle = time.monotonic() + RAMP_SETTLE_MAX
            while not self._flowing() and time.monotonic() < settle:
                if self.stop.wait(0.01) or not any(t.is_alive() for t in threads):
                    return
            # New connections first drain what the server pushed into their socket buffers
            # before it paced them (a burst that would flatter a capped rate): not measured.
            if self.stop.wait(RAMP_WARMUP) or not any(t.is_alive() for t in threads) or not queue:
                return
            before, busy0, t0 = self.done_bytes(), self.busy_seconds(), time.monotonic()
            if self.stop.wait(RAMP_INTERVAL) or not any(t.is_alive() for t in threads) or not queue:
                return
            elapsed = time.monotonic() - t0
            with self._lock:
                size = self.active
            busy1 = self.busy_seconds()
            busy = sum(busy1[t] - busy0[t] for t in busy1 if t in busy0)
            sample = Sample(size, (self.done_bytes() - before) / elapsed, busy / (elapsed * max(1, size)))
            self.samples.append(sample)
            step = ramp_step(sample, paid, self.allowed, len(queue))
            if step <= 0:
                with self._lock:
                    self.allowed = min(self.allowed, -step)
                self.ramping = False
                return
            paid = sample
            spawn(step)
