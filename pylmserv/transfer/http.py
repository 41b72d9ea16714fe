"""HTTP transport for downloads: one urllib3 pool per download, credentials only to
the origin host, raw bodies (decoded only for a Content-Encoding, as Nix does), and the
small parsers the engine needs (Content-Range, errors, names)."""
from __future__ import annotations

import os
import re
import sys
import threading
from typing import Dict, Optional
from urllib.parse import unquote, urljoin, urlsplit

from ..core.errors import ConfigError, NetworkError, VerificationError
from ..core.version import __version__

CHUNK = 256 << 10  # bytes per read; memory per connection stays at about this
CONNECT_TIMEOUT = 15.0
CONNECT_RETRIES = 4  # connection setup failures urllib3 retries (with backoff) before giving up
# A refused connection to this machine means nothing listens on that port: it answers at
# once and the same way again, so the backoff (0.4 + 0.8 + 1.6 s) would only be waiting.
# One immediate retry covers a server that is just being restarted.
LOOPBACK_REFUSED_RETRIES = 1


MAX_REDIRECTS = 10
_REDIRECTS = (301, 302, 303, 307, 308)


class Response:
    """One answer, under the names the engine reads (those of requests' Response):
    status_code, reason, headers (case-insensitive), url (after redirects), raw (urllib3's
    streaming response: read1, read); a context manager that closes it."""

    __slots__ = ("raw", "url", "status_code", "reason", "headers")

    def __init__(self, raw, url: str):
        self.raw = raw
        self.url = url
        self.status_code = raw.status
        self.reason = raw.reason
        self.headers = raw.headers

    def close(self) -> None:
        self.raw.close()
        self.raw.release_conn()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Transport:
    """Pooled connections for one download, on urllib3 alone (requests, with its
    charset detection, idna and cookie modules, costs a download's start about as much
    again as urllib3 and is not needed for GETs of bytes). What requests did for a
    download is kept: proxies and NO_PROXY from the environment, ~/.netrc logins,
    REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE else certifi's CAs, redirects followed (at most
    MAX_REDIRECTS), the given headers (credentials) sent to the origin host only, and a
    netrc login only to the host it names. urllib3 retries connection setup only; cuts
    mid-body are the engine's to retry (it knows where to resume)."""

    def __init__(self, url: str, headers: Dict[str, str], pool_size: int, read_timeout: float,
                 retry_base: float):
        self.origin = origin_of(url)
        self.headers = dict(headers)
        self.pool_size = pool_size
        self.read_timeout = read_timeout
        self.retry_base = retry_base
        self._managers: Dict[Optional[str], object] = {}  # proxy URL (None: direct) -> pool manager
        self._retry = None
        self._lock = threading.Lock()

    @property
    def retry(self):
        if self._retry is None:
            from urllib3.util.retry import Retry

            self._retry = connect_retry(Retry)(total=None, connect=CONNECT_RETRIES, read=0, status=0, other=0,
                                               redirect=0, backoff_factor=self.retry_base, raise_on_status=False,
                                               respect_retry_after_header=False)
        return self._retry

    def manager(self, url: str):
        """The pool manager for `url`: direct, or through the proxy the environment names."""
        proxy = _proxy_for(url)
        with self._lock:
            m = self._managers.get(proxy)
            if m is None:
                import urllib3

                kw = dict(num_pools=4, maxsize=self.pool_size, block=False, ca_certs=_ca_bundle(),
                          cert_reqs="CERT_REQUIRED")
                m = urllib3.ProxyManager(proxy, **kw) if proxy else urllib3.PoolManager(**kw)
                self._managers[proxy] = m
        return m

    def get(self, url: str, extra: Dict[str, str]) -> Response:
        import urllib3

        timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT, read=self.read_timeout)
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"User-Agent": f"pylmserv/{__version__}", "Accept-Encoding": "identity", **extra}
            if origin_of(url) == self.origin:
                headers.update(self.headers)  # credentials only to the host we were given
            if not any(k.lower() == "authorization" for k in headers):
                login = _netrc_auth(url)
                if login:
                    headers["Authorization"] = login
            raw = self.manager(url).urlopen("GET", url, headers=headers, redirect=False, retries=self.retry,
                                            timeout=timeout, preload_content=False, decode_content=False,
                                            assert_same_host=False)
            location = raw.get_redirect_location() if raw.status in _REDIRECTS else None
            if not location:
                return Response(raw, url)
            raw.drain_conn()
            raw.release_conn()
            url = urljoin(url, location)
        raise NetworkError(f"too many redirects for {redact(url)}")


def _proxy_for(url: str) -> Optional[str]:
    """The proxy the environment names for `url` (http_proxy, https_proxy, all_proxy), None
    when there is none or NO_PROXY exempts the host (urllib.request's rules, as requests')."""
    if sys.platform.startswith("linux") and not any(k[-6:].lower() == "_proxy" for k in os.environ):
        return None  # what getproxies() finds on Linux then, without urllib.request's import
    import urllib.request

    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    host = parts.hostname or ""
    if urllib.request.proxy_bypass(f"{host}:{parts.port}" if parts.port else host) or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else "http://" + proxy


def _ca_bundle() -> Optional[str]:
    """REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE, else certifi's bundle (requests' order)."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def _netrc_auth(url: str) -> Optional[str]:
    """A Basic Authorization header from $NETRC or ~/.netrc (~/_netrc) for the URL's host,
    as requests reads it; None when there is no file or no entry."""
    host = urlsplit(url).hostname
    if not host:
        return None
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for name in candidates:
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            continue
        import netrc

        try:
            found = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            return None
        if not found:
            return None
        import base64

        login, _, password = found
        token = base64.b64encode(f"{login or ''}:{password or ''}".encode("latin-1", "replace")).decode()
        return f"Basic {token}"
    return None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (a name, not a lookup)."""
    import ipaddress

    host = (host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_refused(error) -> bool:
    """Is `error` (urllib3's wrapper, or the OS error itself) a refused connection?"""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConnectionRefusedError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


_RETRY_CLASSES: dict = {}


def connect_retry(base):
    """urllib3's Retry (`base`, passed in: urllib3 is imported lazily) with the loopback fast
    path: a refused connection to this machine is retried LOOPBACK_REFUSED_RETRIES times,
    not CONNECT_RETRIES times with backoff. Every other failure is retried as configured."""
    cls = _RETRY_CLASSES.get(base)
    if cls is None:
        class LoopbackAwareRetry(base):
            def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
                if (error is not None and len(self.history) >= LOOPBACK_REFUSED_RETRIES
                        and is_loopback(getattr(_pool, "host", "")) and is_refused(error)):
                    spent = self.new(connect=0)  # exhausted by this failure: MaxRetryError
                    return base.increment(spent, method, url, response, error, _pool, _stacktrace)
                return super().increment(method, url, response, error, _pool, _stacktrace)

        cls = _RETRY_CLASSES[base] = LoopbackAwareRetry
    return cls


_URL_PARTS = re.compile(r"(?P<scheme>[^:/?#]+:)?(?://(?P<netloc>[^/?#]*))?(?P<path>[^?#]*)", re.S)


def redact(url: str) -> str:
    """The URL without query string, fragment or credentials (signed URLs carry secrets).
    Never raises: a URL urllib refuses (a bad port, a broken IPv6 host) is cut by the
    RFC 3986 pattern instead, so an error about a bad URL cannot itself crash or leak."""
    m = _URL_PARTS.match(str(url))
    scheme, netloc, path = m.group("scheme") or "", m.group("netloc"), m.group("path")
    if netloc is None:
        return scheme + path
    return f"{scheme}//{netloc.rpartition('@')[2]}{path}"


def check_url(url: str, where: str) -> str:
    """`url` when urllib can take it apart (host, port): else ConfigError naming it redacted,
    instead of a ValueError traceback from deep inside a download."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in 0-65535)
    except ValueError as exc:
        raise ConfigError(f"{where}: {redact(url)} is not a valid URL ({exc})",
                          hint="Fix the host (an IPv6 address goes in [brackets]) or the port (1-65535).") from None
    return url


MAX_API_ANSWER = 16 << 20  # bytes: a page of tags, a release, a Hub file listing is far smaller


def bounded_json(resp, what: str, source: str, limit: int = 0):
    """The JSON of an API answer (a requests response opened with stream=True), read no
    further than `limit` bytes (default MAX_API_ANSWER): a hostile or broken API cannot make
    pylmserv hold an answer of any size in memory. Raises NetworkError saying what was too
    big; ValueError when it is not JSON."""
    import json

    limit = limit or MAX_API_ANSWER
    declared = resp.headers.get("Content-Length")
    too_big = NetworkError(f"{what}: the answer of {source} is over {limit >> 20} MiB"
                           + (f" ({int(declared)} bytes declared)" if declared and declared.isdigit() else "")
                           + "; stopped reading", hint="An API page is never that large: check the API address "
                                                       "(a proxy?) and try again later.")
    if declared and declared.isdigit() and int(declared) > limit:
        resp.close()
        raise too_big
    import requests

    body = bytearray()
    try:
        for chunk in resp.iter_content(1 << 16):
            body += chunk
            if len(body) > limit:
                raise too_big
    except requests.RequestException as exc:
        raise NetworkError(f"{what}: the answer of {source} was cut: {short_error(exc)}",
                           hint="Try again later.") from None
    finally:
        resp.close()
    return json.loads(bytes(body).decode(resp.encoding or "utf-8", errors="replace") if body else "")


CREDENTIALS_HINT = ("Remove user:password@ from the URL. For a server that needs a login, put it in ~/.netrc "
                    "(`machine HOST login USER password SECRET`, mode 600), which pylmserv's HTTP client reads; "
                    "for the Hugging Face Hub set HF_TOKEN, for GitHub GITHUB_TOKEN.")


def refuse_credentials(url: str, where: str) -> str:
    """`url` when it carries no credentials, else ConfigError (exit 2) naming it redacted.

    A password in a URL would be written into pylmserv.toml, pylmserv.lock, logs and --json
    in clear, so no URL with userinfo is taken at all (http, https, file, git); only an ssh
    URL may name its user (ssh://git@host/..., no password: that is no secret)."""
    m = _URL_PARTS.match(str(url))
    netloc = m.group("netloc") or ""
    if "@" not in netloc:
        return check_url(url, where)
    userinfo = netloc.rpartition("@")[0]
    if (m.group("scheme") or "").lower() in ("ssh:", "git+ssh:", "ssh+git:") and ":" not in userinfo:
        return check_url(url, where)
    raise ConfigError(f"{where}: the URL {redact(url)} carries credentials (a user or password before the @); pylmserv never "
                      "writes them into the config, the lock or its output", hint=CREDENTIALS_HINT)


def load() -> None:
    """Import the download's HTTP library now (urllib3: kept out of commands that need no
    network, and loaded before a transfer's clock starts)."""
    download_errors()


def download_errors() -> tuple:
    """Errors worth a retry in a download (urllib3 alone): cuts, timeouts, protocol errors."""
    import http.client
    import socket

    import urllib3.exceptions

    return (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)


def transient_errors() -> tuple:
    """Errors worth a retry: cuts, timeouts, protocol errors (requests loaded lazily), for
    the clients that use requests (the build cache, registries, APIs)."""
    import requests

    return (requests.exceptions.RequestException,) + download_errors()


def iter_raw(r, limit: Optional[int] = None):
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


def content_encoding(r) -> str:
    """The response's Content-Encoding, '' for none or identity."""
    value = (r.headers.get("Content-Encoding") or "").strip().lower()
    return "" if value in ("", "identity", "none") else value


class GzipDecoder:
    """Decodes a gzip body (several members, as `cat a.gz b.gz`, included)."""

    def __init__(self, url: str):
        import zlib

        self.zlib = zlib
        self.url = url
        self.d = zlib.decompressobj(wbits=31)
        self.midway = False  # the current member has begun but not ended

    def feed(self, data: bytes) -> bytes:
        out = []
        try:
            while data:
                self.midway = True
                out.append(self.d.decompress(data))
                if not self.d.eof:
                    break
                self.midway = False
                data = self.d.unused_data
                self.d = self.zlib.decompressobj(wbits=31)
        except self.zlib.error as exc:
            raise VerificationError(f"{redact(self.url)}: the gzip-encoded body is corrupt ({exc})",
                                    hint="The server or a proxy sent a broken compressed body; try again later.") from None
        return b"".join(out)

    def finish(self) -> None:
        if self.midway:
            raise VerificationError(f"{redact(self.url)}: the gzip-encoded body ends in the middle of a member",
                                    hint="The server or a proxy cut the compressed body; try again later.")


def decoder_for(encoding: str, url: str):
    if encoding in ("gzip", "x-gzip"):
        return GzipDecoder(url)
    raise NetworkError(f"{redact(url)}: the server sent the body with Content-Encoding {encoding!r}, "
                       "which pylmserv does not decode",
                       hint="Nix hashes the decoded body; use a URL that serves the file plainly or with gzip.")


def parse_content_range(value: Optional[str]):
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def raise_http(url: str, r):
    status = r.status_code
    hint = {401: "The server wants credentials: set HF_TOKEN for the Hugging Face Hub.",
            403: "Access denied: check the token's permissions, or that the URL is public.",
            404: "Check the URL, repository, file name and revision.",
            429: "Rate-limited: wait a while and run the command again."}.get(
        status, "Try again later; the partial download (if any) is kept for resume.")
    raise NetworkError(f"HTTP {status} {r.reason or ''} from {redact(r.url or url)}".replace("  ", " "), hint=hint)


def short_error(exc) -> str:
    """One readable line: the OS error inside requests/urllib3 wrappers when there is one."""
    text = str(exc) if not isinstance(exc, str) else exc
    m = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if m:
        return m.group(0).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text[:200]


def file_name(url: str) -> str:
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or urlsplit(url).netloc


def origin_of(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a redirect to a broken host or port: matches no other origin (never printed)
        return f"invalid {url}"
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"
