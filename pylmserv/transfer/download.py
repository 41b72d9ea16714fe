"""HTTP download engine: ranged parallel parts, cross-process resume, verification.

download(url, dest) fetches one URL into `dest` atomically. Over HTTP it probes with a
one-byte ranged GET (size, ETag, Accept-Ranges; HEAD is not signed for S3/CDN URLs),
then splits the file into parts written at their offsets into one preallocated partial
file under the store's tmp/. A sidecar JSON state (URL, ETag, size, part progress) is
saved about four times a second, so a killed process resumes only the missing bytes.

Never splice two versions: every ranged request carries If-Range with the ETag and its
Content-Range start is checked; a 200 to a Range request, a changed ETag or a wrong
Content-Range discards the partial state and starts over. The SHA-256 is computed while
downloading by a thread trailing the contiguous prefix of the file (page cache reads),
and size + hash are checked before the atomic rename into `dest`. Without a strong
validator and without an expected hash, the file comes over one connection (a stitched
file could not be caught); a stall gives up after `stall_limit` seconds without progress.

The pieces: http.py (transport, probe, body decoding), partial.py (the persisted side: the
partial file, its resume state and ResumeState, which keeps both up to date while a run goes
on), scheduler.py (parts to workers, the ramp), hasher.py (trailing SHA-256); this module
runs them: probe, one stream or parallel parts, retries and restarts, verification, install.
"""
from __future__ import annotations

import errno
import hashlib
from ..core.log import get_logger
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional
from urllib.parse import unquote, urlsplit

from ..core.errors import DiskSpaceError, NetworkError, UsageError, VerificationError  # noqa: F401 - DiskSpaceError re-exported
from ..core.flock import FileLock, LockTimeout
from ..core.fsutil import fsync_dir, start_writeback, unlink_missing_ok
from ..core.progress import Progress
from ..core.hashing import EMPTY_SHA256, Hash
from ..core.record import Record, hash_by_value
from .hasher import TrailingHasher
from .partial import WRITEBACK_EVERY, Part, PartialFile, ResumeState, create_fresh
from .scheduler import Demote, PartScheduler, new_parts
from .http import (Transport, content_encoding, decoder_for, file_name, iter_raw,  # noqa: F401 - redact re-exported
                   parse_content_range, raise_http, redact, short_error, download_errors)

log = get_logger("pylmserv.download")

MIN_PART_SIZE = 1 << 20  # parts smaller than this are not worth a request
STALL_TIMEOUT = 30.0  # seconds without a byte before a part is restarted
STALL_LIMIT = 120.0  # seconds without any new byte of the file before giving up for good
STALL_LIMIT_ENV = "PYLMSERV_STALL_LIMIT"
RETRY_BASE = 0.2  # first backoff (seconds), doubled per failed attempt
RETRY_CAP = 8.0
MAX_ATTEMPTS = 8  # consecutive failed attempts of one part (reset by progress)
MAX_RESTARTS = 4  # whole-file restarts (file changed, server misbehaving)


class Probe:
    """What the first request learned. Here, not in http.py: the up-to-date `build` imports
    http.py. A plain class, not a dataclass: `fetch` imports this module (~4 M instructions
    a dataclass); mutable (`response` is dropped once used)."""

    __slots__ = ("final_url", "size", "etag", "last_modified", "ranges", "response", "encoded")

    def __init__(self, final_url: str, size: Optional[int], etag: Optional[str], last_modified: Optional[str],
                 ranges: bool, response: object = None, encoded: bool = False):
        self.final_url = final_url
        self.size = size
        self.etag = etag
        self.last_modified = last_modified
        self.ranges = ranges
        self.response = response  # an open 200 response, reused as the single stream
        self.encoded = encoded  # a Content-Encoding (gzip): sizes and ranges are of the encoded body

    def __repr__(self) -> str:
        return (f"Probe(final_url={self.final_url!r}, size={self.size!r}, etag={self.etag!r}, "
                f"last_modified={self.last_modified!r}, ranges={self.ranges!r}, response={self.response!r}, "
                f"encoded={self.encoded!r})")

    @property
    def validator(self) -> Optional[str]:
        """A strong validator for If-Range: a strong ETag, else Last-Modified, else None."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified or None


class DownloadResult(Record):  # a Record, not a dataclass (see Probe)
    __slots__ = ("path", "sha256", "size", "bytes_downloaded", "seconds")
    path: Path
    sha256: Hash
    size: int
    bytes_downloaded: int  # body bytes received by this call (0 when nothing was needed)
    seconds: float

    __hash__ = hash_by_value


class _Restart(Exception):
    """The partial can no longer be trusted: drop it and probe again."""

    def __init__(self, reason: str, distrust_ranges: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.distrust_ranges = distrust_ranges


# -- public entry point ------------------------------------------------------------

def download(url: str, dest: Path, *, expected: Optional[Hash] = None, size: Optional[int] = None,
             connections: int = 8, headers: Optional[dict] = None, progress: bool = True,
             tmp_dir: Optional[Path] = None, stall_timeout: float = STALL_TIMEOUT,
             stall_limit: Optional[float] = None, min_part_size: int = MIN_PART_SIZE,
             on_progress: Optional[Callable[[int, Optional[int]], None]] = None) -> DownloadResult:
    """Download `url` (http, https, file) to `dest`, verified; return what happened.

    `expected` (sha256) and `size` are checked before `dest` appears; on a mismatch the
    bad bytes are deleted and VerificationError names expected and got. `headers` (e.g.
    Authorization) are sent to the URL's own host only, never to redirect targets.
    Partial files and their state live in `tmp_dir` (default: beside `dest`; the store
    passes its own tmp/ so partials resume across runs).

    `stall_timeout` bounds one silent read (then the request is retried); `stall_limit`
    (default $PYLMSERV_STALL_LIMIT, else 120 s) bounds the time without a single new
    byte of the file across all retries, after which the download gives up."""
    if expected is not None and expected.algo != "sha256":
        raise UsageError(f"download() verifies sha256, got a {expected.algo} hash")
    if connections < 1:
        raise UsageError(f"connections must be >= 1, got {connections}")
    stall_limit = resolve_stall_limit(stall_limit)
    dest = Path(dest)
    started = time.monotonic()
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        got, total, nbytes = _copy_file_url(url, dest, expected, size, progress)
    elif scheme in ("http", "https"):
        tmp_dir = Path(tmp_dir) if tmp_dir is not None else dest.parent
        tmp_dir.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256((expected.hex if expected else url).encode()).hexdigest()[:32]
        base = tmp_dir / f"dl-{key}"
        # One writer per partial; flock dies with its process, so a SIGKILLed owner
        # leaves no stale lock behind (the file stays, harmlessly).
        lock = FileLock(str(base) + ".lock")
        _acquire(lock, url)
        try:
            engine = _Engine(url, base, expected=expected, size=size, connections=connections,
                             headers=headers or {}, progress=progress, stall_timeout=stall_timeout,
                             stall_limit=stall_limit, min_part_size=min_part_size, on_progress=on_progress)
            got, total, nbytes = engine.run()
            _install(engine.partial, dest)
            engine.cleanup_state()
        finally:
            lock.release()
    else:
        raise UsageError(f"unsupported URL scheme in {redact(url)!r}", hint="Use https://, http:// or file://.")
    return DownloadResult(path=dest, sha256=got, size=total, bytes_downloaded=nbytes,
                          seconds=time.monotonic() - started)


def resolve_stall_limit(value: Optional[float] = None) -> float:
    """The no-progress limit in seconds: `value`, else $PYLMSERV_STALL_LIMIT, else 120."""
    source, raw = "--stall-limit", value
    if value is None:
        raw = os.environ.get(STALL_LIMIT_ENV, "").strip()
        if not raw:
            return STALL_LIMIT
        source = STALL_LIMIT_ENV
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
    if not (value > 0 and value < 10**7):  # also refuses NaN and inf
        raise UsageError(f"{source} must be a positive number of seconds, got {raw!r}",
                         hint=f"e.g. {STALL_LIMIT_ENV}=300 to wait up to 5 minutes for a stalled server.")
    return float(value)


def _acquire(lock: FileLock, url: str) -> None:
    try:
        lock.acquire(timeout=0.2)
    except LockTimeout:
        log.info("waiting for another pylmserv process downloading %s", redact(url))
        lock.acquire()


# -- verification ------------------------------------------------------------------

def verify(path: Path, got: Hash, total: int, expected: Optional[Hash], size: Optional[int], url: str) -> None:
    """Raise VerificationError (after deleting `path`) when size or hash differ."""
    if size is not None and total != size:
        reason = _likely_cause(path, got, total)
        unlink_missing_ok(path)
        raise VerificationError(f"size mismatch for {redact(url)}: expected {size} bytes, got {total}{reason}",
                                hint=_mismatch_hint(reason))
    if expected is not None and got != expected:
        reason = _likely_cause(path, got, total)
        unlink_missing_ok(path)
        raise VerificationError(f"hash mismatch for {redact(url)}: expected sha256 {expected.hex}, "
                                f"got {got.hex} ({total} bytes){reason}", hint=_mismatch_hint(reason))


def _likely_cause(path: Path, got: Hash, total: int) -> str:
    if got == EMPTY_SHA256 or total == 0:
        return f" - an empty body (sha256 {EMPTY_SHA256.hex}): likely a proxy or error page"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return ""
    if _looks_like_html(head):
        return " - the body is an HTML page: likely a proxy login or error page"
    return ""


def _looks_like_html(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml"))


def _mismatch_hint(reason: str) -> str:
    if reason:
        return "Check proxy settings and that the URL serves the file itself; the bad data was deleted."
    return "The server sent different bytes than pinned; the bad data was deleted. Re-check the pin or the URL."


# -- file:// -----------------------------------------------------------------------

def _copy_file_url(url: str, dest: Path, expected, size, progress) -> tuple:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"file URL with a host is not supported: {url!r}", hint="Use file:///absolute/path.")
    src = Path(unquote(parts.path))
    if not src.is_file():
        raise NetworkError(f"no such file: {src}", hint="Check the file:// URL.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
    h = hashlib.sha256()
    total = 0
    bar = _make_progress(src.name, src.stat().st_size, progress, None)
    try:
        with open(src, "rb") as fin, os.fdopen(create_fresh(tmp, os.O_WRONLY), "wb") as fout:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            while True:
                n = fin.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
                _write_all(fout, view[:n], tmp)
                total += n
                bar.update(n)
            fout.flush()
            os.fsync(fout.fileno())
        got = Hash.from_hashlib(h)
        verify(tmp, got, total, expected, size, url)
        os.replace(tmp, dest)
    except BaseException:
        unlink_missing_ok(tmp)
        raise
    finally:
        bar.close()
    return got, total, total


def _write_all(f, data, path) -> None:
    try:
        f.write(data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskSpaceError(f"no space left on device writing {path}",
                                 hint="Free some space (see `pylmserv doctor`) and run the command again.") from None
        raise


def _install(partial: Path, dest: Path) -> None:
    """Move the verified partial to dest atomically (copy + replace across filesystems)."""

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(partial, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        import shutil  # lazy for speed: only a move across filesystems copies

        try:
            shutil.copyfile(partial, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            unlink_missing_ok(tmp)
            raise
        unlink_missing_ok(partial)
    fsync_dir(dest.parent)


def _make_progress(desc: str, total: Optional[int], enabled: bool, on_progress):

    return Progress(desc, total, enabled=enabled, callback=on_progress)


def _sleep_backoff(attempt: int, retry_after=None, stop: Optional[threading.Event] = None) -> None:
    delay = min(RETRY_CAP, RETRY_BASE * (2 ** (attempt - 1))) * (0.5 + random.random() / 2)
    if retry_after:
        try:
            delay = min(30.0, max(delay, float(retry_after)))
        except ValueError:
            pass
    if stop is not None:
        stop.wait(delay)
    else:
        time.sleep(delay)


# -- HTTP engine ---------------------------------------------------------------------

class _Engine:
    def __init__(self, url, base: Path, *, expected, size, connections, headers, progress,
                 stall_timeout, min_part_size, on_progress, stall_limit=STALL_LIMIT):
        self.url = url
        self.file = PartialFile(base, url)
        self.partial = self.file.path
        self.expected = expected
        self.size = size
        self.connections = connections
        self.headers = dict(headers)
        self.progress = progress
        self.stall_limit = stall_limit
        self.stall_timeout = min(stall_timeout, stall_limit)  # one silent read never outlasts the limit
        self.last_progress = time.monotonic()  # when the last new byte of the file arrived
        self.min_part_size = max(1, min_part_size)
        self.on_progress = on_progress
        self.received = 0  # body bytes received (all attempts)
        self._lock = threading.Lock()
        self.http = Transport(url, headers, pool_size=max(connections, 2) + 2,
                              read_timeout=self.stall_timeout, retry_base=RETRY_BASE)
        self.transient = download_errors()

    def _count(self, n: int) -> None:
        with self._lock:
            self.received += n

    def _next_attempt(self, exc, attempt: int) -> int:
        """The single-connection path's retry count after a transient error; gives up on a
        stall or after MAX_ATTEMPTS."""
        self._check_stalled(exc, kept=False)
        attempt += 1
        if attempt > MAX_ATTEMPTS:
            raise NetworkError(f"download of {redact(self.url)} keeps failing: {short_error(exc)}",
                               hint="Check your network and try again.") from None
        return attempt

    def _check_stalled(self, reason, kept: bool = True) -> None:
        """Give up once no new byte has arrived for stall_limit seconds, however many
        retries and restarts that took: a stalled server costs a bounded time."""
        idle = time.monotonic() - self.last_progress
        if idle < self.stall_limit:
            return
        keep = ("The partial download is kept: run the same command again to resume. " if kept else "")
        raise NetworkError(f"download of {redact(self.url)} stalled: no new data for {idle:.0f} s "
                           f"({short_error(reason)}); giving up",
                           hint=keep + f"To wait longer for a slow server, pass --stall-limit SECONDS or set "
                                       f"{STALL_LIMIT_ENV} (now {self.stall_limit:g} s).")

    # -- main loop -----------------------------------------------------------
    def run(self):
        restarts = 0
        trust_ranges = True
        prev_etag = None
        while True:
            probe = self._probe(use_ranges=trust_ranges)
            try:
                if self.size is not None and probe.size is not None and probe.size != self.size:
                    self._close(probe)
                    self.discard()
                    raise VerificationError(
                        f"size mismatch for {redact(self.url)}: expected {self.size} bytes, the server offers {probe.size}",
                        hint="The file behind the URL changed or the pin is wrong; nothing was downloaded.")
                parallel = probe.ranges and probe.size is not None and trust_ranges
                if parallel and probe.validator is None and self.expected is None:
                    # Nothing proves that two ranges come from the same version of the
                    # file, and no hash would catch a stitched one: one connection, so
                    # the hash recorded is that of one real file.
                    log.info("%s: no strong ETag or Last-Modified and no expected hash: one connection",
                             file_name(self.url))
                    parallel = False
                if parallel:
                    got, total = self._run_parts(probe)
                else:
                    got, total = self._run_single(probe)
            except _Restart as exc:
                restarts += 1
                self._close(probe)
                self.discard()
                if exc.distrust_ranges or (prev_etag is not None and probe.etag == prev_etag):
                    trust_ranges = False  # the server, not the file, is at fault: one plain stream
                if restarts > MAX_RESTARTS:
                    raise NetworkError(f"giving up on {redact(self.url)} after {restarts} restarts: {exc.reason}",
                                       hint="The server keeps changing the file or mishandles ranges; try again later.")
                log.warning("restarting %s from scratch: %s", redact(self.url), exc.reason)
                prev_etag = probe.etag
                continue
            try:
                verify(self.partial, got, total, self.expected, self.size, self.url)
            except VerificationError:
                self.discard()  # bad bytes are never kept, not even for a resume
                raise
            return got, total, self.received

    @staticmethod
    def _close(probe: Probe) -> None:
        if probe.response is not None:
            probe.response.close()
            probe.response = None

    def discard(self) -> None:
        self.file.discard()

    def cleanup_state(self) -> None:
        self.file.cleanup_state()

    # -- probing -------------------------------------------------------------
    def _probe(self, use_ranges: bool = True) -> Probe:
        """GET bytes=0-0: size, ETag and range support in one round trip."""
        attempt = 0
        while True:
            try:
                r = self.http.get(self.url, {"Range": "bytes=0-0"} if use_ranges else {})
            except NetworkError:
                raise
            except Exception as exc:  # refused, DNS, TLS: urllib3's Retry has already retried
                raise NetworkError(f"cannot reach {redact(self.url)}: {short_error(exc)}",
                                   hint="Check the URL and your network/proxy settings.") from None
            status = r.status_code
            if status in (500, 502, 503, 504, 408, 429) and attempt < 3:
                r.close()
                attempt += 1
                _sleep_backoff(attempt, r.headers.get("Retry-After"))
                continue
            etag = r.headers.get("ETag")
            lm = r.headers.get("Last-Modified")
            if status in (200, 206) and content_encoding(r):
                # Sizes and ranges would be those of the compressed body: one stream, decoded.
                decoder_for(content_encoding(r), self.url)  # refuse an encoding we cannot decode, now
                if status == 206:
                    r.close()
                    return Probe(r.url, None, etag, lm, False, encoded=True)
                return Probe(r.url, None, etag, lm, False, response=r, encoded=True)
            if status == 206:
                cr = parse_content_range(r.headers.get("Content-Range"))
                r.close()
                if cr is None or cr[2] is None:
                    return Probe(r.url, None, etag, lm, False)
                return Probe(r.url, cr[2], etag, lm, cr[0] == 0)
            if status == 200:
                length = r.headers.get("Content-Length")
                size = int(length) if length and length.isdigit() else None
                return Probe(r.url, size, etag, lm, False, response=r)
            if status == 416:
                # bytes=0-0 of an empty file is unsatisfiable: `bytes */0`.
                cr = r.headers.get("Content-Range", "")
                r.close()
                m = re.match(r"bytes \*/(\d+)", cr)
                if m and int(m.group(1)) == 0:
                    return Probe(r.url, 0, etag, lm, False)
                return self._probe(use_ranges=False) if use_ranges else raise_http(self.url, r)
            r.close()
            raise_http(self.url, r)

    # -- one plain stream (no ranges) -----------------------------------------
    def _run_single(self, probe: Probe):
        """No usable ranges: one stream from byte 0; a cut restarts from 0.

        A body with Content-Encoding gzip is decoded: the file is what Nix's fetchers
        store and hash (they decode it too), not the compressed transfer."""
        attempt = 0
        best = 0  # the most bytes of the file any attempt got: only more is progress
        while True:
            r = probe.response
            probe.response = None
            if r is None:
                try:
                    r = self.http.get(self.url, {})
                except NetworkError:
                    raise
                except self.transient as exc:
                    attempt = self._next_attempt(exc, attempt)
                    _sleep_backoff(attempt)
                    continue
                if r.status_code != 200:
                    r.close()
                    if r.status_code in (500, 502, 503, 504, 408, 429) and attempt < MAX_ATTEMPTS:
                        self._check_stalled(f"HTTP {r.status_code}", kept=False)
                        attempt += 1
                        _sleep_backoff(attempt, r.headers.get("Retry-After"))
                        continue
                    raise_http(self.url, r)
            encoding = content_encoding(r)
            decoder = decoder_for(encoding, self.url) if encoding else None
            length = r.headers.get("Content-Length")
            wire_total = int(length) if length and length.isdigit() else None  # bytes on the wire
            total = self.size if encoding else (wire_total if wire_total is not None else probe.size)
            self.file.check_space(total or wire_total or 0)
            h = hashlib.sha256()
            written = wire = flushed = 0
            bar = _make_progress(file_name(self.url), total, self.progress, self.on_progress)
            try:
                with r, self.file.open_fresh() as f:
                    try:
                        for chunk in iter_raw(r):
                            self._count(len(chunk))
                            wire += len(chunk)
                            data = decoder.feed(chunk) if decoder else chunk
                            h.update(data)
                            _write_all(f, data, self.partial)
                            written += len(data)
                            if written - flushed >= WRITEBACK_EVERY:  # write-behind (the fsync below stays)
                                f.flush()
                                start_writeback(f.fileno())
                                flushed = written
                            if written > best:
                                best = written
                                self.last_progress = time.monotonic()
                            bar.update(len(data))
                        if decoder is not None and (wire_total is None or wire == wire_total):
                            decoder.finish()
                    except self.transient as exc:
                        attempt = self._next_attempt(exc, attempt)
                        log.warning("connection cut after %d bytes (%s); the server has no ranges, starting over",
                                    written, short_error(exc))
                        _sleep_backoff(attempt)
                        continue
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                bar.close()
            if wire_total is not None and wire != wire_total and (self.size is None or encoding):
                self._check_stalled(f"got {wire} of {wire_total} bytes", kept=False)
                attempt += 1
                if attempt > MAX_ATTEMPTS:
                    raise NetworkError(f"{redact(self.url)}: got {wire} of {wire_total} bytes",
                                       hint="The connection keeps breaking; try again later.")
                continue
            return Hash.from_hashlib(h), written

    # -- parallel parts -----------------------------------------------------
    def _run_parts(self, probe: Probe):
        size = probe.size
        self.final_url = probe.final_url
        self.validator = probe.validator
        self.probe_etag = probe.etag
        state = self.state = ResumeState(self.file, self.min_part_size)
        parts = state.open(size, probe.etag, self.validator,
                           lambda n: new_parts(n, self.connections, self.min_part_size))
        if state.resumed:
            log.info("resuming %s: %d of %d bytes already here", file_name(self.url), state.done(), size)
        self.parts = parts
        self.size_total = size
        self.fd = state.fd
        self.stop = threading.Event()
        self.sched = PartScheduler(parts, self.connections, self.stop)
        self.cond = cond = threading.Condition()
        self.bar = bar = _make_progress(file_name(self.url), size, self.progress, self.on_progress)
        bar.update(state.done())
        self.hasher = hasher = TrailingHasher(state.fd, self.sched.contiguous, cond)
        hasher.start()
        state.start()
        try:
            self.sched.run(self._fetch_run)
            if self.sched.error is not None:
                raise self.sched.error
            hasher.finish(size)
            got = hasher.result()
            os.fsync(state.fd)
            return got, size
        finally:
            self.stop.set()
            with cond:
                cond.notify_all()
            hasher.stop()
            bar.close()
            # A restart or bad bytes drop the partial: no state worth keeping for them.
            state.close(keep=not isinstance(self.sched.error, (_Restart, VerificationError)))

    def _fetch_run(self, run: List[int]) -> None:
        """Consecutive parts (only the first may be partly done) in one ranged request, so
        a connection that keeps up pays one request for several parts."""
        parts = [self.parts[i] for i in run]
        end = parts[-1].end
        attempt = 0
        while parts[-1].remaining and not self.stop.is_set():
            todo = [p for p in parts if p.remaining]
            start = todo[0].start + todo[0].done
            hdrs = {"Range": f"bytes={start}-{end - 1}"}
            if self.validator:
                hdrs["If-Range"] = self.validator
            try:
                r = self.http.get(self.final_url, hdrs)
            except NetworkError:
                raise
            except self.transient as exc:
                attempt = self._retry(attempt, exc)
                continue
            with r:
                status = r.status_code
                if status == 200:
                    raise _Restart("the server answered a range request with the whole file "
                                   "(the file changed or ranges are not honoured)")
                if status == 416:
                    raise _Restart("the server refused a valid range (416): the file changed")
                if status in (403, 429):
                    attempt = self._refused(status, r, attempt)
                    continue
                if status in (500, 502, 503, 504, 408):
                    attempt = self._retry(attempt, f"HTTP {status}", r.headers.get("Retry-After"))
                    continue
                if status != 206:
                    raise_http(self.final_url, r)
                cr = parse_content_range(r.headers.get("Content-Range"))
                if cr is None or cr[0] != start or (cr[2] is not None and cr[2] != self.size_total):
                    raise _Restart(f"Content-Range {r.headers.get('Content-Range')!r} does not match the requested "
                                   f"bytes={start}-{end - 1}/{self.size_total}", distrust_ranges=True)
                if content_encoding(r):
                    raise _Restart(f"the server sent a range with Content-Encoding {content_encoding(r)!r}",
                                   distrust_ranges=True)
                etag = r.headers.get("ETag")
                if etag and self.probe_etag and etag != self.probe_etag:
                    raise _Restart(f"ETag changed from {self.probe_etag} to {etag}: the file changed")
                before = sum(p.done for p in todo)
                try:
                    for part in todo:
                        self._stream_part(r, part)
                except self.transient as exc:
                    if sum(p.done for p in todo) > before:
                        attempt = 0  # progress was made: the budget is for consecutive failures
                    attempt = self._retry(attempt, exc)
                    continue

    def _stream_part(self, r, part: Part) -> None:
        for chunk in iter_raw(r, limit=part.remaining):
            if self.stop.is_set():
                return
            n = len(chunk)
            self._count(n)
            try:
                os.pwrite(self.fd, chunk, part.start + part.done)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DiskSpaceError(f"no space left on device writing {self.partial}; "
                                         "the partial download is kept for resume",
                                         hint="Free some space and run the same command again.") from None
                raise
            self.hasher.offer(part.start + part.done, chunk)
            self.sched.note_chunk()
            self.last_progress = time.monotonic()
            with self.cond:
                part.done += n
                self.cond.notify_all()
            self.bar.update(n)
        if part.remaining and not self.stop.is_set():
            raise ConnectionError(f"body ended {part.remaining} bytes early")

    def _retry(self, attempt: int, exc, retry_after=None) -> int:
        self._check_stalled(exc)
        attempt += 1
        if attempt > MAX_ATTEMPTS:
            raise NetworkError(f"download of {redact(self.url)} keeps failing: {short_error(exc)}",
                               hint="The partial download is kept; run the same command again to resume.")
        log.debug("retrying a part of %s (%s), attempt %d", redact(self.url), short_error(exc), attempt)
        _sleep_backoff(attempt, retry_after, self.stop)
        return attempt

    def _refused(self, status: int, r, attempt: int) -> int:
        """403/429: too many parallel ranges, or (403) an expired signed URL."""
        if self.sched.demote():
            log.info("HTTP %d on a parallel range: going down to %d connection(s)", status, self.sched.active)
            raise Demote()
        if status == 429:
            return self._retry(attempt, "HTTP 429", r.headers.get("Retry-After"))
        if attempt >= 2:
            raise_http(self.final_url, r)
        # A single connection still refused: the signed redirect may have expired.
        probe = self._probe()
        self._close(probe)
        if probe.etag != self.probe_etag or probe.size != self.size_total:
            raise _Restart("the file changed while re-resolving an expired URL")
        log.info("re-resolved %s", redact(self.url))
        self.final_url = probe.final_url
        return attempt + 1
