"""The part scheduler: which byte range goes to which connection, and how many.

Parts are handed out in file order (the trailing hasher then keeps pace with the
download) to at most `connections` worker threads. A worker refused by the server
(403/429 on a parallel range: Demote) gives its part back and the pool shrinks for good;
the first fatal error of any worker stops all of them.
"""
from __future__ import annotations

import threading
from typing import Callable, List, Optional

from ..core.errors import Demote
from .partial import Part

MAX_PART_SIZE = 64 << 20
PARTS_PER_CONNECTION = 8  # small parts taken in order: the hash keeps up with the download


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
                return True
        return False

    def run(self, fetch_part: Callable[[int], None]) -> None:
        """Run workers over the part queue until every part is done or one fails."""
        pending = [i for i, p in enumerate(self.parts) if p.remaining]
        while pending and self.error is None:
            queue = list(pending)
            qlock = threading.Lock()

            def take():
                with qlock:
                    return queue.pop(0) if queue else None

            def put_back(i):
                with qlock:
                    queue.insert(0, i)

            def worker():
                while not self.stop.is_set():
                    i = take()
                    if i is None:
                        return
                    try:
                        fetch_part(i)
                    except Demote:
                        put_back(i)
                        return
                    except BaseException as exc:  # first fatal error stops everyone
                        with self._lock:
                            if self.error is None:
                                self.error = exc
                        self.stop.set()
                        return

            self.active = min(self.allowed, len(queue))
            threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.active)]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
            pending = [i for i, p in enumerate(self.parts) if p.remaining]
