"""Logging for all of pylmserv, loaded only when a line is written.

`import logging` (with the traceback, string, weakref and threading modules it brings)
costs milliseconds that an up-to-date `pylmserv build` - which logs nothing at the default
level - must not pay (issue 18: within Python start + 100 ms). So every module takes its
logger from here:

    from ..core.log import get_logger
    log = get_logger("pylmserv.build")

and the CLI calls configure(level) where it used to install its handler. Until a line at
or above that level is written, nothing is imported: a call below it returns at once. The
first line that must be written imports logging and installs the recorded configuration
on the "pylmserv" logger (a StreamHandler on the stderr of the configure() call, the
formatter that escapes control characters, the level, no propagation), then logs.

Without configure() (pylmserv used as a library) a logger behaves exactly like
logging.getLogger(name), imported at its first call; no handler is installed by us.

This is the one module of pylmserv that imports logging (tests/test_log.py checks it), so
nothing bypasses a configuration that is still pending.
"""
from __future__ import annotations

import sys
from _thread import allocate_lock

from .names import show

# logging's levels, so that callers need not import it to ask isEnabledFor(DEBUG).
CRITICAL = 50
ERROR = 40
WARNING = 30
INFO = 20
DEBUG = 10
NOTSET = 0

ROOT = "pylmserv"
FORMAT = "%(message)s"

# (level, stream) from configure(), installed by the first line written; None when nothing
# waits (installed already, or never configured: library use).
_pending = None
_install_lock = allocate_lock()  # the C lock: a threading import here would undo the point


def configure(level: int, stream=None) -> None:
    """The CLI's logging: `level` and above on `stream` (default: sys.stderr as it is now),
    control characters escaped, on the "pylmserv" logger (not propagated). Installed at the
    first line that must be written, or now if logging is loaded already (nothing to save)."""
    global _pending
    _pending = (level, sys.stderr if stream is None else stream)
    if "logging" in sys.modules:
        _install()


def _install() -> None:
    global _pending
    with _install_lock:
        if _pending is None:
            return
        import logging

        level, stream = _pending
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_safe_formatter(logging))
        root = logging.getLogger(ROOT)
        root.handlers[:] = [handler]
        root.setLevel(level)
        root.propagate = False
        _pending = None  # last: another thread writes only once the handler is in place


def _safe_formatter(logging):
    class SafeFormatter(logging.Formatter):
        """Log lines carry names, URLs and server answers: control characters escaped."""

        def format(self, record) -> str:
            return show(super().format(record), lines=True)

    return SafeFormatter(FORMAT)


class Logger:
    """Stands for logging.getLogger(name); see the module's docstring. Anything not
    defined here (handlers, setLevel, ...) is the real logger's, loaded on first use."""

    __slots__ = ("name", "_ours", "_logger")

    def __init__(self, name: str):
        self.name = name
        self._ours = name == ROOT or name.startswith(ROOT + ".")  # under the configured logger
        self._logger = None

    def _real(self):
        if _pending is not None:
            _install()
        logger = self._logger
        if logger is None:
            import logging

            logger = self._logger = logging.getLogger(self.name)
        return logger

    def isEnabledFor(self, level: int) -> bool:
        pending = _pending
        if pending is not None and self._ours:
            return level >= pending[0]
        return self._real().isEnabledFor(level)

    def _emit(self, level: int, msg, args, kwargs) -> None:
        pending = _pending
        if pending is None or not self._ours or pending[0] <= level:
            # +2: the record names the caller of debug()/info()/..., not this proxy
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 2
            self._real().log(level, msg, *args, **kwargs)

    def debug(self, msg, *args, **kwargs) -> None:
        self._emit(DEBUG, msg, args, kwargs)

    def info(self, msg, *args, **kwargs) -> None:
        self._emit(INFO, msg, args, kwargs)

    def warning(self, msg, *args, **kwargs) -> None:
        self._emit(WARNING, msg, args, kwargs)

    def error(self, msg, *args, **kwargs) -> None:
        self._emit(ERROR, msg, args, kwargs)

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        self._emit(ERROR, msg, args, dict(kwargs, exc_info=exc_info))

    def critical(self, msg, *args, **kwargs) -> None:
        self._emit(CRITICAL, msg, args, kwargs)

    def log(self, level: int, msg, *args, **kwargs) -> None:
        self._emit(level, msg, args, kwargs)

    def __getattr__(self, attr):
        return getattr(self._real(), attr)

    def __repr__(self) -> str:
        return f"<pylmserv logger {self.name}>"


def get_logger(name: str) -> Logger:
    """The logger `name` (a "pylmserv..." name), importing logging only when it writes."""
    return Logger(name)
