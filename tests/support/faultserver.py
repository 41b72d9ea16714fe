"""A real HTTP/1.1 server on 127.0.0.1 that injects download faults on demand.

Files are served from memory (bytes) or disk (Path, sent with sendfile when no fault
shapes the body). Tests flip fault switches on `server.faults` and read counters
(`bytes_sent`, `requests`) to prove what went over the wire. `bytes_sent` is read once
the server has finished answering (a client can hold every byte of a body a moment before
the handler counts it); `sent_so_far` is the live count, for watching a transfer.

Faults (all off by default):
  cut_at / cut_times         close the connection after N body bytes, for the next K responses
  ignore_range               answer every Range request with 200 and the whole file
  wrong_content_range        206 whose Content-Range (and body) start one byte early
  range_416                  416 to every Range request except the bytes=0-0 probe
  max_parallel / parallel_status
                             403 (or 429) when more ranged requests than this run at once
  html                       200 with an HTML error page instead of the file
  empty                      200 with an empty body
  rate                       bytes per second per connection
  link_rate                  bytes per second shared by all connections (the link's capacity)
  stall_after / stall_times / stall_seconds
                             stop sending after N body bytes for S seconds, K times
  fail_status / fail_times   answer the next K requests with this status (503)
  chunked                    200, Transfer-Encoding: chunked, no length, no ranges, no ETag
  no_etag / weak_etag        send no ETag, or only a weak one (W/"..."): no strong validator
  last_modified              send this Last-Modified (and honour If-Range with it)
  gzip                       200 with the body gzip-compressed (Content-Encoding: gzip),
                             ranges ignored, as a misconfigured server or proxy does
  signed_ttl                 /signed/PATH redirects to /s/TOKEN/PATH; a token is valid
                             for this many requests, then 403 (an expired signed URL)
Other routes: /redirect/PATH -> 302 to PATH on `redirect_base` (another server = a CDN).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Union

LINK_BUFFER = 0.1  # seconds of sending the shared link (link_rate) holds in hand
IDLE_TIMEOUT = 60.0  # seconds to wait for the last answers to end (wait_idle, reset_counters)

@dataclass
class Faults:
    cut_at: Optional[int] = None
    cut_times: int = 0
    ignore_range: bool = False
    wrong_content_range: bool = False
    range_416: bool = False
    max_parallel: Optional[int] = None
    parallel_status: int = 403
    html: bool = False
    empty: bool = False
    rate: Optional[float] = None
    link_rate: Optional[float] = None
    stall_after: Optional[int] = None
    stall_times: int = 0
    stall_seconds: float = 5.0
    signed_ttl: Optional[int] = None
    no_etag: bool = False
    fail_status: int = 503
    fail_times: int = 0
    chunked: bool = False
    weak_etag: bool = False
    last_modified: Optional[str] = None
    gzip: bool = False


@dataclass
class Request:
    method: str
    path: str
    headers: Dict[str, str]
    status: int = 0
    sent: int = 0


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that hang up mid-body are the point of this server


class FaultServer:
    def __init__(self, port: int = 0):
        self.files: Dict[str, Union[bytes, Path]] = {}
        self.etags: Dict[str, str] = {}
        self.faults = Faults()
        self.requests: List[Request] = []
        self.sent_so_far = 0  # body bytes written so far (live)
        self.redirect_base: Optional[str] = None
        self.lock = threading.Lock()
        self.active_ranges = 0
        self.peak_ranges = 0  # most ranged requests in flight at once
        self.busy = 0  # requests being answered right now (headers, body, error page)
        self.link_free = 0.0  # when the shared link (link_rate) is free to send again
        self.idle = threading.Condition(self.lock)  # notified whenever an answer ends
        self.on_request = None  # callable(server, Request), run before each request is served
        self.tokens: Dict[str, int] = {}
        self._token_ids = itertools.count(1)
        self.httpd = _QuietServer(("127.0.0.1", port), _handler_for(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def add(self, path: str, data: Union[bytes, Path]) -> str:
        """Serve `data` at /path (a new ETag each time it changes); returns the URL."""
        path = "/" + path.lstrip("/")
        with self.lock:
            self.files[path] = data
            digest = hashlib.sha256(data if isinstance(data, bytes) else str(Path(data).stat().st_mtime_ns).encode())
            self.etags[path] = '"' + digest.hexdigest()[:20] + '"'
        return self.url(path)

    def reset_counters(self) -> None:
        """Start counting afresh, once the last answers (an earlier client's) have ended."""
        with self.idle:
            self._wait_idle_locked(IDLE_TIMEOUT)
            self.requests.clear()
            self.sent_so_far = 0
            self.peak_ranges = 0

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent, counted once no request is being answered."""
        return self.wait_idle()

    def wait_idle(self, timeout: float = IDLE_TIMEOUT) -> int:
        """Block until no request is being answered (a failed or killed client's last
        requests have ended on the server side too, error pages included); returns
        bytes_sent then. An event, not a guess with sleeps."""
        with self.idle:
            self._wait_idle_locked(timeout)
            return self.sent_so_far

    def _wait_idle_locked(self, timeout: float) -> None:
        if not self.idle.wait_for(lambda: self.busy == 0, timeout):
            raise AssertionError(f"the server still answers {self.busy} requests after {timeout}s")

    def ranged_requests(self) -> List[Request]:
        return [r for r in self.requests if "Range" in r.headers]

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def fault_server():
    server = FaultServer().start()
    try:
        yield server
    finally:
        server.stop()


HTML_PAGE = b"<!DOCTYPE html><html><head><title>Proxy error</title></head><body>Access denied by proxy</body></html>\n"


def _handler_for(server: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        srv = server

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._answer(head=True)

        def do_GET(self):
            self._answer(head=False)

        def _answer(self, head: bool):
            with self.srv.lock:
                self.srv.busy += 1
            try:
                self._serve(head)
            finally:
                with self.srv.idle:
                    self.srv.busy -= 1
                    self.srv.idle.notify_all()

        # -- routing -------------------------------------------------------
        def _serve(self, head: bool):
            srv = self.srv
            req = Request(self.command, self.path, dict(self.headers.items()))
            with srv.lock:
                srv.requests.append(req)
            if srv.on_request is not None:
                srv.on_request(srv, req)
            path = self.path.split("?", 1)[0]
            f = srv.faults
            with srv.lock:
                failing = f.fail_times > 0
                if failing:
                    f.fail_times -= 1
            if failing:
                return self._simple(req, f.fail_status, b"try again\n")
            if path.startswith("/redirect/"):
                return self._redirect(req, (srv.redirect_base or srv.base) + path[len("/redirect"):])
            if path.startswith("/signed/"):
                with srv.lock:
                    token = f"t{next(srv._token_ids)}"
                    srv.tokens[token] = f.signed_ttl or 10**9
                return self._redirect(req, f"{srv.base}/s/{token}{path[len('/signed'):]}")
            m = re.match(r"^/s/(t\d+)(/.*)$", path)
            if m:
                with srv.lock:
                    left = srv.tokens.get(m.group(1), 0)
                    srv.tokens[m.group(1)] = left - 1
                if left <= 0:
                    return self._simple(req, 403, b"signature expired\n")
                path = m.group(2)
            with srv.lock:
                data = srv.files.get(path)
                etag = srv.etags.get(path)
            if data is None:
                return self._simple(req, 404, b"not found\n")
            if f.html:
                return self._simple(req, 200, HTML_PAGE, ctype="text/html")
            if f.empty:
                return self._simple(req, 200, b"")
            size = len(data) if isinstance(data, bytes) else Path(data).stat().st_size
            if f.chunked:
                return self._chunked(req, data if isinstance(data, bytes) else Path(data).read_bytes())
            if f.gzip:
                import gzip

                body = gzip.compress(data if isinstance(data, bytes) else Path(data).read_bytes(), mtime=0)
                req.status = 200
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self._body(req, body, 0, len(body))
                return
            if f.weak_etag and etag:
                etag = "W/" + etag
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            start, end, status = 0, size - 1, 200
            strong = etag if etag and not etag.startswith("W/") and not f.no_etag else None
            if_range_ok = if_range is None or if_range in (strong, f.last_modified)
            if rng and not f.ignore_range and if_range_ok:
                mm = re.match(r"bytes=(\d*)-(\d*)$", rng.strip())
                if mm:
                    a, b = mm.group(1), mm.group(2)
                    start = int(a) if a else max(0, size - int(b))
                    end = min(int(b), size - 1) if (a and b) else size - 1
                    probe = (start == 0 and end == 0)
                    if start >= size or (f.range_416 and not probe):
                        return self._simple(req, 416, b"", extra={"Content-Range": f"bytes */{size}"})
                    status = 206
            parallel = status == 206 and not (start == 0 and end == 0)
            if parallel:
                with srv.lock:
                    srv.active_ranges += 1
                    srv.peak_ranges = max(srv.peak_ranges, srv.active_ranges)
                    over = f.max_parallel is not None and srv.active_ranges > f.max_parallel
                if over:
                    with srv.lock:
                        srv.active_ranges -= 1
                    return self._simple(req, f.parallel_status, b"too many connections\n",
                                        extra={"Retry-After": "0"} if f.parallel_status == 429 else None)
            try:
                shown_start = start
                if status == 206 and f.wrong_content_range and start > 0:
                    shown_start = start - 1
                req.status = status
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                if etag and not f.no_etag:
                    self.send_header("ETag", etag)
                if f.last_modified:
                    self.send_header("Last-Modified", f.last_modified)
                self.send_header("Content-Length", str(end - shown_start + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {shown_start}-{end}/{size}")
                self.end_headers()
                if not head:
                    self._body(req, data, shown_start, end + 1)
            finally:
                if parallel:
                    with srv.lock:
                        srv.active_ranges -= 1

        # -- bodies ----------------------------------------------------------
        def _body(self, req: Request, data, start: int, stop: int) -> None:
            srv, f = self.srv, self.srv.faults
            cut = stall = None
            with srv.lock:
                if f.cut_at is not None and f.cut_times > 0:
                    f.cut_times -= 1
                    cut = f.cut_at
                if f.stall_after is not None and f.stall_times > 0:
                    f.stall_times -= 1
                    stall = f.stall_after
                rate, link_rate = f.rate, f.link_rate
            plain = cut is None and stall is None and rate is None and link_rate is None and not isinstance(data, bytes)
            if plain:
                return self._sendfile(req, Path(data), start, stop)
            pos, sent = start, 0
            chunk = 16 << 10
            t0 = time.monotonic()
            fh = open(data, "rb") if not isinstance(data, bytes) else None
            try:
                while pos < stop:
                    n = min(chunk, stop - pos)
                    if cut is not None:
                        n = min(n, cut - sent)
                        if n <= 0:
                            self._abort()
                            return
                    if stall is not None and sent >= stall:
                        time.sleep(f.stall_seconds)
                        self._abort()
                        return
                    if stall is not None:
                        n = min(n, max(1, stall - sent))
                    if fh is None:
                        piece = data[pos:pos + n]
                    else:
                        fh.seek(pos)
                        piece = fh.read(n)
                    try:
                        self.wfile.write(piece)
                    except OSError:
                        return
                    pos += len(piece)
                    sent += len(piece)
                    self._count(req, len(piece))
                    if rate:
                        ahead = sent / rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                    if link_rate:  # every connection queues for the one link
                        with srv.lock:
                            # The link keeps LINK_BUFFER seconds of sending in hand (what
                            # socket buffers do): a sender's late wake-up is made up, so one
                            # connection fills the link however the host's timers oversleep.
                            now = time.monotonic()
                            free = max(srv.link_free, now - LINK_BUFFER) if srv.link_free else now
                            srv.link_free = free + len(piece) / link_rate
                            until = srv.link_free
                        time.sleep(max(0.0, until - time.monotonic()))
                if cut is not None and sent >= cut:
                    self._abort()
            finally:
                if fh is not None:
                    fh.close()

        def _sendfile(self, req: Request, path: Path, start: int, stop: int) -> None:
            self.wfile.flush()
            with open(path, "rb") as fh:
                pos = start
                while pos < stop:
                    try:
                        n = os.sendfile(self.connection.fileno(), fh.fileno(), pos, min(stop - pos, 8 << 20))
                    except OSError:
                        return
                    if n == 0:
                        return
                    pos += n
                    self._count(req, n)

        def _chunked(self, req: Request, data: bytes) -> None:
            req.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for pos in range(0, len(data), 100_000):
                piece = data[pos:pos + 100_000]
                self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                self._count(req, len(piece))
            self.wfile.write(b"0\r\n\r\n")

        def _count(self, req: Request, n: int) -> None:
            with self.srv.lock:
                self.srv.sent_so_far += n
                req.sent += n

        def _abort(self) -> None:
            """Drop the connection mid-body (RST, like a dying proxy)."""
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _simple(self, req: Request, status: int, body: bytes, ctype: str = "text/plain", extra=None):
            req.status = status
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)
                self._count(req, len(body))

        def _redirect(self, req: Request, location: str):
            req.status = 302
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
