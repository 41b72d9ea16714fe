"""Progress reporting: a tqdm bar on a TTY, a log line every few seconds otherwise.

Thread-safe: several download connections update one bar (the aggregate per file).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Optional

from .log import INFO, get_logger

log = get_logger("pylmserv.progress")

LOG_INTERVAL = 5.0  # seconds between log lines when stderr is not a terminal


class Progress:
    def __init__(self, desc: str, total: Optional[int], enabled: bool = True,
                 callback: Optional[Callable[[int, Optional[int]], None]] = None,
                 stream=None, interval: float = LOG_INTERVAL):
        self.desc = desc
        self.total = total
        self.n = 0
        self.callback = callback
        self.interval = interval
        self._lock = threading.Lock()
        self._bar = None
        self._enabled = enabled
        self._started = time.monotonic()
        self._last_log = self._started
        stream = stream if stream is not None else sys.stderr
        if enabled and _isatty(stream) and log.isEnabledFor(INFO):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                             file=stream, leave=True, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if not n:
            return
        with self._lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)
            elif self._enabled:
                now = time.monotonic()
                if now - self._last_log >= self.interval:
                    self._last_log = now
                    log.info("%s", self.line(now))
            if self.callback is not None:
                self.callback(self.n, self.total)  # under the lock: callers see n grow in order

    def line(self, now: Optional[float] = None) -> str:
        elapsed = max(1e-6, (now or time.monotonic()) - self._started)
        rate = self.n / elapsed
        if self.total:
            return (f"{self.desc}: {self.n / 2**20:.1f}/{self.total / 2**20:.1f} MiB "
                    f"({100.0 * self.n / self.total:.0f}%) at {rate / 2**20:.1f} MiB/s")
        return f"{self.desc}: {self.n / 2**20:.1f} MiB at {rate / 2**20:.1f} MiB/s"

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
