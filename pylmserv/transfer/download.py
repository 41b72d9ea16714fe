"""HTTP download engine: ranged parallel parts, cross-process resume, verification.

download(url, dest) fetches one URL into `dest` atomically. Over HTTP it probes with a
one-byte ranged GET (size, ETag, Accept-Ranges; HEAD is not signed for S3/CDN URLs),
then splits the file into parts written at their offsets into one preallocated partial
file under the store's tmp/. A sidecar JSON state (URL, ETag, size, part progress) is
saved about twice a second, so a killed process resumes only the missing bytes.

Never splice two versions: every ranged request carries If-Range with the ETag and its
Content-Range start is checked; a 200 to a Range request, a changed ETag or a wrong
Content-Range discards the partial state and starts over. The SHA-256 is computed while
downloading by a thread trailing the contiguous prefix of the file (page cache reads),
and size + hash are checked before the atomic rename into `dest`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

from ..core.errors import DiskSpaceError, NetworkError, UsageError, VerificationError  # noqa: F401 - DiskSpaceError re-exported
from ..core.fsutil import fsync_dir, unlink_missing_ok
from ..core.progress import Progress
from ..core.version import __version__
from ..core.hashing import EMPTY_SHA256, Hash

log = logging.getLogger("pylmserv.download")

MIN_PART_SIZE = 1 << 20  # parts smaller than this are not worth a request
MAX_PART_SIZE = 64 << 20
PARTS_PER_CONNECTION = 8  # small parts taken in order: the hash keeps up with the download
CHUNK = 256 << 10  # bytes per read; memory per connection stays at about this
STALL_TIMEOUT = 30.0  # seconds without a byte before a part is restarted
CONNECT_TIMEOUT = 15.0
RETRY_BASE = 0.2  # first backoff (seconds), doubled per failed attempt
RETRY_CAP = 8.0
MAX_ATTEMPTS = 8  # consecutive failed attempts of one part (reset by progress)
MAX_RESTARTS = 4  # whole-file restarts (file changed, server misbehaving)
STATE_INTERVAL = 0.25  # seconds between sidecar state saves (bounds what a kill re-sends)
SYNC_EVERY = 32 << 20  # bytes between background fdatasyncs of the partial
STATE_EVERY = 0.01  # ... or this fraction of the file, whichever comes first
STATE_VERSION = 1


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    sha256: Hash
    size: int
    bytes_downloaded: int  # body bytes received by this call (0 when nothing was needed)
    seconds: float


class _Restart(Exception):
    """The partial can no longer be trusted: drop it and probe again."""

    def __init__(self, reason: str, distrust_ranges: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.distrust_ranges = distrust_ranges


class _Demote(Exception):
    """403/429 on a parallel range: this worker stops so fewer connections remain."""


# -- public entry point ------------------------------------------------------------

def download(url: str, dest: Path, *, expected: Optional[Hash] = None, size: Optional[int] = None,
             connections: int = 8, headers: Optional[dict] = None, progress: bool = True,
             tmp_dir: Optional[Path] = None, stall_timeout: float = STALL_TIMEOUT,
             min_part_size: int = MIN_PART_SIZE,
             on_progress: Optional[Callable[[int, Optional[int]], None]] = None) -> DownloadResult:
    """Download `url` (http, https, file) to `dest`, verified; return what happened.

    `expected` (sha256) and `size` are checked before `dest` appears; on a mismatch the
    bad bytes are deleted and VerificationError names expected and got. `headers` (e.g.
    Authorization) are sent to the URL's own host only, never to redirect targets.
    Partial files and their state live in `tmp_dir` (default: beside `dest`; the store
    passes its own tmp/ so partials resume across runs)."""
    if expected is not None and expected.algo != "sha256":
        raise UsageError(f"download() verifies sha256, got a {expected.algo} hash")
    if connections < 1:
        raise UsageError(f"connections must be >= 1, got {connections}")
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
        from filelock import FileLock

        # One writer per partial; flock dies with its process, so a SIGKILLed owner
        # leaves no stale lock behind (the file stays, harmlessly).
        lock = FileLock(str(base) + ".lock")
        _acquire(lock, url)
        try:
            engine = _Engine(url, base, expected=expected, size=size, connections=connections,
                             headers=headers or {}, progress=progress, stall_timeout=stall_timeout,
                             min_part_size=min_part_size, on_progress=on_progress)
            got, total, nbytes = engine.run()
            _install(engine.partial, dest)
            engine.cleanup_state()
        finally:
            lock.release()
    else:
        raise UsageError(f"unsupported URL scheme in {redact(url)!r}", hint="Use https://, http:// or file://.")
    return DownloadResult(path=dest, sha256=got, size=total, bytes_downloaded=nbytes,
                          seconds=time.monotonic() - started)


def redact(url: str) -> str:
    """The URL without query string or credentials (signed URLs carry secrets)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _acquire(lock, url: str) -> None:
    from filelock import Timeout

    try:
        lock.acquire(timeout=0.2)
    except Timeout:
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
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
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


# -- HTTP engine ---------------------------------------------------------------------

@dataclass
class _Probe:
    final_url: str
    size: Optional[int]
    etag: Optional[str]
    last_modified: Optional[str]
    ranges: bool
    response: object = None  # an open 200 response, reused as the single stream


class _Part:
    __slots__ = ("start", "end", "done")

    def __init__(self, start: int, end: int, done: int = 0):
        self.start, self.end, self.done = start, end, done  # end is exclusive

    @property
    def remaining(self) -> int:
        return self.end - self.start - self.done


class _Engine:
    def __init__(self, url, base: Path, *, expected, size, connections, headers, progress,
                 stall_timeout, min_part_size, on_progress):
        self.url = url
        self.partial = Path(str(base) + ".part")
        self.state_path = Path(str(base) + ".state.json")
        self.expected = expected
        self.size = size
        self.connections = connections
        self.headers = dict(headers)
        self.progress = progress
        self.stall_timeout = stall_timeout
        self.min_part_size = max(1, min_part_size)
        self.on_progress = on_progress
        self.origin = _netloc(url)
        self.received = 0  # body bytes received (all attempts)
        self._lock = threading.Lock()
        self._session = None
        self.transient = _transient_errors()

    # -- plumbing ------------------------------------------------------------
    @property
    def session(self):
        if self._session is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry


            s = requests.Session()
            # urllib3 retries connection setup; cuts mid-body are retried by the part loop.
            retry = Retry(total=None, connect=4, read=0, status=0, other=0, redirect=10,
                          backoff_factor=RETRY_BASE, raise_on_status=False, respect_retry_after_header=False)
            adapter = HTTPAdapter(max_retries=retry, pool_connections=4,
                                  pool_maxsize=max(self.connections, 2) + 2)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers.update({"User-Agent": f"pylmserv/{__version__}", "Accept-Encoding": "identity"})
            self._session = s
        return self._session

    def _get(self, url: str, extra: Dict[str, str]):
        headers = dict(extra)
        if _netloc(url) == self.origin:
            headers.update(self.headers)  # credentials only to the host we were given
        import requests

        try:
            return self.session.get(url, headers=headers, stream=True, allow_redirects=True,
                                    timeout=(CONNECT_TIMEOUT, self.stall_timeout))
        except requests.exceptions.TooManyRedirects:
            raise NetworkError(f"too many redirects for {redact(url)}") from None

    def _count(self, n: int) -> None:
        with self._lock:
            self.received += n

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
                if probe.ranges and probe.size is not None and trust_ranges:
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
    def _close(probe: _Probe) -> None:
        if probe.response is not None:
            probe.response.close()
            probe.response = None

    def discard(self) -> None:
        unlink_missing_ok(self.state_path)
        unlink_missing_ok(self.partial)

    def cleanup_state(self) -> None:
        unlink_missing_ok(self.state_path)

    # -- probing -------------------------------------------------------------
    def _probe(self, use_ranges: bool = True) -> _Probe:
        """GET bytes=0-0: size, ETag and range support in one round trip."""
        attempt = 0
        while True:
            try:
                r = self._get(self.url, {"Range": "bytes=0-0"} if use_ranges else {})
            except NetworkError:
                raise
            except Exception as exc:  # refused, DNS, TLS: urllib3's Retry has already retried
                raise NetworkError(f"cannot reach {redact(self.url)}: {_short(exc)}",
                                   hint="Check the URL and your network/proxy settings.") from None
            status = r.status_code
            if status in (500, 502, 503, 504, 408, 429) and attempt < 3:
                r.close()
                attempt += 1
                _sleep_backoff(attempt, r.headers.get("Retry-After"))
                continue
            etag = r.headers.get("ETag")
            lm = r.headers.get("Last-Modified")
            if status == 206:
                cr = _parse_content_range(r.headers.get("Content-Range"))
                r.close()
                if cr is None or cr[2] is None:
                    return _Probe(r.url, None, etag, lm, False)
                return _Probe(r.url, cr[2], etag, lm, cr[0] == 0)
            if status == 200:
                length = r.headers.get("Content-Length")
                size = int(length) if length and length.isdigit() else None
                return _Probe(r.url, size, etag, lm, False, response=r)
            if status == 416:
                # bytes=0-0 of an empty file is unsatisfiable: `bytes */0`.
                cr = r.headers.get("Content-Range", "")
                r.close()
                m = re.match(r"bytes \*/(\d+)", cr)
                if m and int(m.group(1)) == 0:
                    return _Probe(r.url, 0, etag, lm, False)
                return self._probe(use_ranges=False) if use_ranges else _raise_http(self.url, r)
            r.close()
            _raise_http(self.url, r)

    # -- one plain stream (no ranges) -----------------------------------------
    def _run_single(self, probe: _Probe):
        """No usable ranges: one stream from byte 0; a cut restarts from 0."""
        attempt = 0
        while True:
            r = probe.response
            probe.response = None
            if r is None:
                r = self._get(self.url, {})
                if r.status_code != 200:
                    r.close()
                    if r.status_code in (500, 502, 503, 504, 408, 429) and attempt < MAX_ATTEMPTS:
                        attempt += 1
                        _sleep_backoff(attempt, r.headers.get("Retry-After"))
                        continue
                    _raise_http(self.url, r)
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else probe.size
            self._check_space(total or 0)
            h = hashlib.sha256()
            written = 0
            bar = _make_progress(_name(self.url), total, self.progress, self.on_progress)
            try:
                with r, open(self.partial, "wb") as f:
                    try:
                        for chunk in _iter_raw(r):
                            self._count(len(chunk))
                            h.update(chunk)
                            _write_all(f, chunk, self.partial)
                            written += len(chunk)
                            bar.update(len(chunk))
                    except self.transient as exc:
                        attempt += 1
                        if attempt > MAX_ATTEMPTS:
                            raise NetworkError(f"download of {redact(self.url)} keeps failing: {_short(exc)}",
                                               hint="Check your network and try again.") from None
                        log.warning("connection cut after %d bytes (%s); the server has no ranges, starting over",
                                    written, _short(exc))
                        _sleep_backoff(attempt)
                        continue
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                bar.close()
            if total is not None and written != total and self.size is None:
                attempt += 1
                if attempt > MAX_ATTEMPTS:
                    raise NetworkError(f"{redact(self.url)}: got {written} of {total} bytes",
                                       hint="The connection keeps breaking; try again later.")
                continue
            return Hash.from_hashlib(h), written

    # -- parallel parts -----------------------------------------------------
    def _run_parts(self, probe: _Probe):
        size = probe.size
        self.final_url = probe.final_url
        self.validator = probe.etag if probe.etag and not probe.etag.startswith("W/") else probe.last_modified
        self.probe_etag = probe.etag
        parts = self._load_state(probe)
        if parts is None:
            parts = self._new_parts(size)
            self._check_space(size)
            self._preallocate(size)
            try:
                self._save_state(parts, size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                self.discard()
                raise DiskSpaceError(f"no space left on device in {self.partial.parent}",
                                     hint="Free some space and run the command again.") from None
        else:
            have = sum(p.done for p in parts)
            log.info("resuming %s: %d of %d bytes already here", _name(self.url), have, size)
        self.parts = parts
        self.size_total = size
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.allowed = self.connections
        cond = threading.Condition()
        self.cond = cond
        bar = _make_progress(_name(self.url), size, self.progress, self.on_progress)
        bar.update(sum(p.done for p in parts))
        self.bar = bar
        fd = os.open(self.partial, os.O_RDWR)
        self.fd = fd
        hasher = _TrailingHasher(fd, self._contiguous, cond)
        self.hasher = hasher
        saver = threading.Thread(target=self._saver, daemon=True)
        syncer = threading.Thread(target=self._syncer, daemon=True)
        hasher.start()
        saver.start()
        syncer.start()
        try:
            self._work()
            if self.error is not None:
                raise self.error
            hasher.finish(size)
            got = hasher.result()
            os.fsync(fd)
            return got, size
        finally:
            self.stop.set()
            with cond:
                cond.notify_all()
            hasher.stop()
            saver.join(5)
            syncer.join(30)
            bar.close()
            if self.partial.exists() and any(p.remaining for p in parts) and not isinstance(self.error, (_Restart, VerificationError)):
                try:
                    self._save_state(parts, size)
                except OSError as exc:  # e.g. the disk is full: the last saved state still holds
                    log.warning("could not update the resume state of %s: %s", _name(self.url), exc.strerror)
            os.close(fd)

    def _new_parts(self, size: int) -> List[_Part]:
        """Parts of about size/(connections*8), handed out in file order.

        SHA-256 is sequential: with many small parts taken in order, the finished
        prefix of the file grows steadily and the trailing hasher keeps pace, instead
        of one big pass at the end (as with one part per connection)."""
        step = -(-size // (self.connections * PARTS_PER_CONNECTION))
        step = max(self.min_part_size, min(MAX_PART_SIZE, step))
        return [_Part(a, min(a + step, size)) for a in range(0, size, step)] or [_Part(0, 0)]

    def _preallocate(self, size: int) -> None:
        """Create the partial at its final size, sparse.

        Not posix_fallocate: on ext4 every write into fallocated (unwritten) extents
        pays an extent conversion, measured 10x slower here. Free space is checked up
        front instead, and ENOSPC while writing keeps the partial for resume."""
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                raise DiskSpaceError(f"cannot create a {size}-byte file in {self.partial.parent}: {exc.strerror}",
                                     hint="Free some space or point PYLMSERV_HOME at a larger disk.") from None
            raise
        finally:
            os.close(fd)

    def _check_space(self, need: int) -> None:
        try:
            free = shutil.disk_usage(self.partial.parent).free
        except OSError:
            return
        if need and free < need:
            raise DiskSpaceError(f"not enough free space in {self.partial.parent}: {need} bytes needed, {free} free",
                                 hint="Free some space or point PYLMSERV_HOME at a larger disk.")

    def _contiguous(self) -> int:
        n = 0
        for p in self.parts:
            n = p.start + p.done
            if p.remaining:
                break
        return n

    def _work(self) -> None:
        """Run workers over the part queue; a demoted worker leaves its part to others."""
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
                        self._fetch_part(i)
                    except _Demote:
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

    def _fetch_part(self, i: int) -> None:
        part = self.parts[i]
        attempt = 0
        while part.remaining and not self.stop.is_set():
            start = part.start + part.done
            hdrs = {"Range": f"bytes={start}-{part.end - 1}"}
            if self.validator:
                hdrs["If-Range"] = self.validator
            try:
                r = self._get(self.final_url, hdrs)
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
                    _raise_http(self.final_url, r)
                cr = _parse_content_range(r.headers.get("Content-Range"))
                if cr is None or cr[0] != start or (cr[2] is not None and cr[2] != self.size_total):
                    raise _Restart(f"Content-Range {r.headers.get('Content-Range')!r} does not match the requested "
                                   f"bytes={start}-{part.end - 1}/{self.size_total}", distrust_ranges=True)
                etag = r.headers.get("ETag")
                if etag and self.probe_etag and etag != self.probe_etag:
                    raise _Restart(f"ETag changed from {self.probe_etag} to {etag}: the file changed")
                before = part.done
                try:
                    self._stream_part(r, part)
                except self.transient as exc:
                    if part.done > before:
                        attempt = 0  # progress was made: the budget is for consecutive failures
                    attempt = self._retry(attempt, exc)
                    continue

    def _stream_part(self, r, part: _Part) -> None:
        for chunk in _iter_raw(r, limit=part.remaining):
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
            offset = part.start + part.done
            with self.cond:
                part.done += n
                self.cond.notify_all()
            self.hasher.offer(offset, chunk)
            self.bar.update(n)
        if part.remaining and not self.stop.is_set():
            raise ConnectionError(f"body ended {part.remaining} bytes early")

    def _retry(self, attempt: int, exc, retry_after=None) -> int:
        attempt += 1
        if attempt > MAX_ATTEMPTS:
            raise NetworkError(f"download of {redact(self.url)} keeps failing: {_short(exc)}",
                               hint="The partial download is kept; run the same command again to resume.")
        log.debug("retrying a part of %s (%s), attempt %d", redact(self.url), _short(exc), attempt)
        _sleep_backoff(attempt, retry_after, self.stop)
        return attempt

    def _refused(self, status: int, r, attempt: int) -> int:
        """403/429: too many parallel ranges, or (403) an expired signed URL."""
        with self._lock:
            if self.active > 1:
                self.active -= 1
                self.allowed = max(1, min(self.allowed, self.active))
                log.info("HTTP %d on a parallel range: going down to %d connection(s)", status, self.active)
                raise _Demote()
        if status == 429:
            return self._retry(attempt, "HTTP 429", r.headers.get("Retry-After"))
        if attempt >= 2:
            _raise_http(self.final_url, r)
        # A single connection still refused: the signed redirect may have expired.
        probe = self._probe()
        self._close(probe)
        if probe.etag != self.probe_etag or probe.size != self.size_total:
            raise _Restart("the file changed while re-resolving an expired URL")
        log.info("re-resolved %s", redact(self.url))
        self.final_url = probe.final_url
        return attempt + 1

    # -- sidecar state -------------------------------------------------------
    def _saver(self) -> None:
        last_time, last_bytes = time.monotonic(), -1
        every = max(self.min_part_size, int(self.size_total * STATE_EVERY))
        while not self.stop.wait(0.05):
            done = sum(p.done for p in self.parts)
            now = time.monotonic()
            if done != last_bytes and (now - last_time >= STATE_INTERVAL or done - last_bytes >= every):
                try:
                    self._save_state(self.parts, self.size_total)
                except OSError:
                    pass
                last_time, last_bytes = now, done

    def _syncer(self) -> None:
        """Flush finished bytes to disk while downloading, so the fsync before the
        install (the store trusts blobs without re-hashing) has little left to do."""
        synced = 0
        while not self.stop.wait(0.1):
            done = sum(p.done for p in self.parts)
            if done - synced >= SYNC_EVERY:
                try:
                    os.fdatasync(self.fd)
                except OSError:
                    return
                synced = done

    def _save_state(self, parts: List[_Part], size: int) -> None:
        """Record part progress: temp file + rename, so a reader never sees half a state.

        Not fsynced, on purpose: the page cache outlives a killed process, which is what
        resume is for; after a power cut a stale or zero-filled part only costs a
        re-download, because the whole file is hashed before it is installed."""
        with self._lock:
            snapshot = [[p.start, p.end, p.done] for p in parts]  # only bytes already written
        data = {"version": STATE_VERSION, "url": self.url, "etag": self.probe_etag,
                "validator": self.validator, "size": size, "parts": snapshot}
        tmp = self.state_path.with_name(f"{self.state_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.state_path)
        except OSError:
            unlink_missing_ok(tmp)  # the previous state stays valid: it only undercounts
            raise

    def _load_state(self, probe: _Probe) -> Optional[List[_Part]]:
        try:
            data = json.loads(self.state_path.read_text())
            st = self.partial.stat()
        except (OSError, ValueError):
            self.discard()
            return None
        ok = (data.get("version") == STATE_VERSION and data.get("url") == self.url
              and data.get("size") == probe.size and st.st_size == probe.size
              and data.get("etag") == probe.etag and data.get("validator") == self.validator
              and self.validator)  # no strong validator: no proof it is the same file, start over
        if not ok:
            log.info("discarding a partial download of %s: the file changed or the state is stale", _name(self.url))
            self.discard()
            return None
        try:
            parts = [_Part(int(a), int(b), int(d)) for a, b, d in data["parts"]]
        except (KeyError, TypeError, ValueError):
            self.discard()
            return None
        if not parts or any(not (0 <= p.done <= p.end - p.start) for p in parts) or parts[-1].end != probe.size:
            self.discard()
            return None
        return parts


class _TrailingHasher:
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


# -- helpers -------------------------------------------------------------------------

def _transient_errors() -> tuple:
    """Errors worth a retry: cuts, timeouts, protocol errors (requests loaded lazily)."""
    import http.client
    import socket

    import requests
    import urllib3.exceptions

    return (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
            ConnectionError, TimeoutError, socket.timeout)


def _iter_raw(r, limit: Optional[int] = None):
    """Raw body chunks as they arrive (no content decoding), stopping after `limit` bytes.

    read1 returns what the socket has instead of blocking for a full chunk, so a cut or
    a stall loses no byte already received: the resume starts exactly after it."""
    raw = r.raw
    read = raw.read1 if hasattr(raw, "read1") else raw.read
    left = limit
    while left is None or left > 0:
        want = CHUNK if left is None else min(CHUNK, left)
        data = read(want, decode_content=False)
        if not data:
            return
        if left is not None:
            left -= len(data)
        yield data


def _parse_content_range(value: Optional[str]):
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def _raise_http(url: str, r):
    status = r.status_code
    hint = {401: "The server wants credentials: set HF_TOKEN for the Hugging Face Hub.",
            403: "Access denied: check the token's permissions, or that the URL is public.",
            404: "Check the URL, repository, file name and revision.",
            429: "Rate-limited: wait a while and run the command again."}.get(
        status, "Try again later; the partial download (if any) is kept for resume.")
    raise NetworkError(f"HTTP {status} {r.reason or ''} from {redact(r.url or url)}".replace("  ", " "), hint=hint)


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


def _short(exc) -> str:
    """One readable line: the OS error inside requests/urllib3 wrappers when there is one."""
    text = str(exc) if not isinstance(exc, str) else exc
    m = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if m:
        return m.group(0).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text[:200]


def _name(url: str) -> str:
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or urlsplit(url).netloc


def _netloc(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"
