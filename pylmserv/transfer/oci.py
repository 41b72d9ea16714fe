"""An OCI distribution client: any blob by its digest, manifests, auth as container tools do.

Written on requests rather than taken from a library: oras-py (the ORAS Python SDK, the
maintained candidate on PyPI) reads a whole blob into memory for a monolithic upload
(`fd.read()`), has no Range/resume on blob GETs, and follows redirects with the session's
headers; a multi-GB model needs all three done differently. The protocol subset a
content-addressed store needs is small (the OCI distribution spec, v1.1):

  GET/HEAD /v2/<repo>/blobs/<digest>          (Range: bytes=N- to resume)
  POST /v2/<repo>/blobs/uploads/ -> Location; PUT Location?digest=  (monolithic, streamed)
                                   or PATCH chunks (Content-Range) then PUT ?digest=
  GET/PUT /v2/<repo>/manifests/<tag-or-digest>

Auth: a 401 answer's WWW-Authenticate challenge decides. `Basic` gets the credentials of
the auth files (REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json and
~/.config/containers/auth.json; then $DOCKER_CONFIG/config.json or ~/.docker/config.json);
`Bearer realm=...,service=...,scope=...` gets a token from the realm (with those
credentials, when there are any) and retries. Credentials are held in memory only, never
in argv, logs, errors or the lock; `Authorization` goes to the registry and its token realm
only, never to a redirect target (blob GETs are often redirected to object storage).

Plain HTTP only to loopback registries (127.0.0.0/8, ::1, localhost), as Docker does, or
to the hosts named in $PYLMSERV_INSECURE_REGISTRIES (space-separated HOST[:PORT]); the
same rule holds for every redirect and token realm. Every blob pulled is hashed while it
is written and checked against its digest (and size) before the caller sees it.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import quote, urlencode, urljoin, urlsplit

from ..core.errors import NetworkError, UsageError, VerificationError
from ..core.fsutil import unlink_missing_ok
from ..core.hashing import Hash
from ..core.log import get_logger
from ..core.record import Record, hash_by_value
from ..core.version import __version__
from .http import CHUNK, CONNECT_TIMEOUT, short_error

log = get_logger("pylmserv.oci")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST)
MAX_MANIFEST = 4 << 20  # the distribution spec's limit; a bigger answer is refused unread
MAX_REDIRECTS = 5
READ_TIMEOUT = 60.0
INSECURE_ENV = "PYLMSERV_INSECURE_REGISTRIES"
DEFAULT_CHUNK = 0  # 0: monolithic PUT (streamed); >0: PATCH chunks of this many bytes

_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


# -- references ----------------------------------------------------------------------------

class OciRef(Record):  # a Record, not a dataclass: `fetch` imports this module (~4 M instructions a dataclass)
    """oci://HOST[:PORT]/REPO: a repository on a registry (no tag: pulls go by digest)."""

    __slots__ = ("host", "repo")
    host: str  # hostname[:port], as written (lower-cased)
    repo: str

    __hash__ = hash_by_value

    @classmethod
    def parse(cls, text: str) -> "OciRef":
        rest = text[len("oci://"):].rstrip("/") if text.startswith("oci://") else text
        host, _, repo = rest.partition("/")
        if "@" in host:  # user:password@host: never echoed back
            raise UsageError("a registry reference carries credentials (USER:PASSWORD@HOST); refused",
                             hint="Put the login in an auth file (REGISTRY_AUTH_FILE, "
                                  "~/.config/containers/auth.json or ~/.docker/config.json).")
        if not text.startswith("oci://"):
            raise UsageError(f"not an oci:// reference: {text!r}", hint="Use oci://HOST[:PORT]/REPO.")
        parts = urlsplit("//" + host)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not host or "@" in host or not parts.hostname or port == -1:
            raise UsageError(f"bad registry host in {text!r}",
                             hint="Use oci://HOST[:PORT]/REPO (no credentials in the reference: "
                                  "they come from the auth files).")
        if not repo or not _REPO_RE.match(repo) or len(repo) > 255:
            raise UsageError(f"bad repository name {repo!r} in {text!r}",
                             hint="Lower-case letters, digits and . _ - separators, path parts joined by '/'.")
        return cls(host.lower(), repo)

    @property
    def hostname(self) -> str:
        return urlsplit("//" + self.host).hostname or self.host

    def __str__(self) -> str:
        return f"oci://{self.host}/{self.repo}"


def is_loopback(hostname: str) -> bool:
    name = hostname.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def insecure_hosts() -> set:
    return {h.lower() for h in os.environ.get(INSECURE_ENV, "").split()}


def plain_http_allowed(netloc: str, insecure: Optional[Iterable[str]] = None) -> bool:
    """Plain HTTP to `netloc` (host[:port]): loopback, or named as insecure."""
    netloc = netloc.lower()
    hostname = urlsplit("//" + netloc).hostname or netloc
    allowed = insecure_hosts() if insecure is None else {h.lower() for h in insecure}
    return is_loopback(hostname) or netloc in allowed or hostname in allowed


def check_url(url: str, insecure: Optional[Iterable[str]] = None, what: str = "registry") -> None:
    """Refuse a URL the transport rules forbid: not http(s), or plain HTTP to a remote host."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and plain_http_allowed(parts.netloc, insecure):
        return
    raise NetworkError(f"{what}: refusing {parts.scheme or 'a schemeless'} URL to {parts.netloc or '?'} "
                       "(plain HTTP is only for loopback registries)",
                       hint=f"Use https, or name the host in {INSECURE_ENV} if it really is a trusted "
                            "registry on plain HTTP.")


# -- credentials ---------------------------------------------------------------------------

class Credentials:
    """A user name and secret from an auth file; the secret never appears in repr/str."""

    __slots__ = ("username", "_secret", "source")

    def __init__(self, username: str, secret: str, source: str):
        self.username = username
        self._secret = secret
        self.source = source

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self._secret}".encode()).decode()

    def __repr__(self) -> str:
        return f"<Credentials for {self.username!r} from {self.source}>"

    __str__ = __repr__


def auth_files(env=None) -> List[Path]:
    """Where container tools keep registry credentials, in the order they are consulted."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    files: List[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    else:
        if env.get("XDG_RUNTIME_DIR"):
            files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
        files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(Path(env["DOCKER_CONFIG"]) / "config.json" if env.get("DOCKER_CONFIG")
                 else home / ".docker" / "config.json")
    return files


def _auth_key(key: str) -> str:
    """An auths key as container tools write it ('https://host:port/v1/', 'host/ns') -> 'host[/path]'."""
    key = key.strip().lower()
    if "://" in key:
        key = key.split("://", 1)[1]
    key = key.rstrip("/")
    for suffix in ("/v1", "/v2"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return key


def find_credentials(host: str, repo: str = "", env=None) -> Optional[Credentials]:
    """The credentials for `host` (most specific 'host/repo-prefix' key first) from the first
    auth file that has any; None when there are none (anonymous access)."""
    wanted = [host.lower()]
    parts = repo.lower().split("/") if repo else []
    wanted = [f"{host.lower()}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + wanted
    for path in auth_files(env):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable auth file, skipped (%s)", path, type(exc).__name__)
            continue
        auths = data.get("auths") if isinstance(data, dict) else None
        if not isinstance(auths, dict):
            continue
        entries = {_auth_key(k): v for k, v in auths.items() if isinstance(v, dict)}
        for key in wanted:
            entry = entries.get(key)
            if entry is None:
                continue
            creds = _entry_credentials(entry, f"{path} ({key})")
            if creds is not None:
                return creds
        if isinstance(data.get("credHelpers"), dict) and host in data["credHelpers"] or data.get("credsStore"):
            log.info("%s: credential helpers are not supported; put the login in an auths entry", path)
    return None


def _entry_credentials(entry: dict, source: str) -> Optional[Credentials]:
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, secret = base64.b64decode(entry["auth"], validate=False).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            log.warning("%s: the auth value is not base64 of user:password; ignored", source)
            return None
        if sep:
            return Credentials(user, secret, source)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"], source)
    return None


def parse_challenge(header: str) -> Tuple[str, Dict[str, str]]:
    """'Bearer realm="x",service="y",scope="a,b"' -> ('bearer', {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))', rest):
        params[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    return scheme.lower(), params


# -- the client ------------------------------------------------------------------------------

class BlobInfo(Record):  # a Record (never changed after creation), not a dataclass: see OciRef
    __slots__ = ("digest", "size")
    digest: Hash
    size: Optional[int]


class _Bounded:
    """A file-like view of `length` bytes of `f` from its current position (a PATCH body)."""

    def __init__(self, f, length: int, on_read: Optional[Callable[[int], None]] = None):
        self.f, self.left, self.on_read, self.len = f, length, on_read, length

    def __len__(self):
        return self.len

    def __iter__(self):  # requests sends an iterable with a length as CHUNK-sized writes
        while True:
            data = self.read(CHUNK)
            if not data:
                return
            yield data

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(min(n, CHUNK))
        self.left -= len(data)
        if self.on_read:
            self.on_read(len(data))
        return data


class Registry:
    """One repository on one registry. Not thread-safe; one per transfer."""

    def __init__(self, ref: OciRef, insecure: Optional[Iterable[str]] = None, env=None,
                 read_timeout: float = READ_TIMEOUT):
        self.ref = ref
        self.read_timeout = read_timeout  # seconds a read may wait for a byte (a stall gives up)
        self.insecure = set(insecure) if insecure is not None else None
        self.scheme = "http" if plain_http_allowed(ref.host, self.insecure) else "https"
        self.base = f"{self.scheme}://{ref.host}/v2/{ref.repo}"
        self.env = env
        self._creds: Optional[Credentials] = None
        self._creds_loaded = False
        self._authorization: Optional[str] = None
        self._session = None

    def __repr__(self) -> str:
        return f"<Registry {self.ref}>"

    # -- transport --

    @property
    def session(self):
        if self._session is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            s = requests.Session()
            s.trust_env = False  # no ~/.netrc credentials, no proxy env surprises for loopback
            retry = Retry(total=None, connect=3, read=0, status=0, other=0, redirect=0, backoff_factor=0.2,
                          raise_on_status=False)
            adapter = HTTPAdapter(max_retries=retry, pool_connections=2, pool_maxsize=4)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers.update({"User-Agent": f"pylmserv/{__version__}", "Accept-Encoding": "identity"})
            self._session = s
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()

    def _credentials(self) -> Optional[Credentials]:
        if not self._creds_loaded:
            self._creds = find_credentials(self.ref.host, self.ref.repo, self.env)
            self._creds_loaded = True
        return self._creds

    def _own(self, url: str) -> bool:
        p = urlsplit(url)
        return p.scheme == self.scheme and p.netloc.lower() == self.ref.host

    def _raw(self, method: str, url: str, headers: dict, data=None, stream: bool = False):
        import requests

        check_url(url, self.insecure, what=str(self.ref))
        h = dict(headers)
        if self._own(url) and self._authorization:
            h["Authorization"] = self._authorization
        try:
            return self.session.request(method, url, headers=h, data=data, stream=stream, allow_redirects=False,
                                        timeout=(CONNECT_TIMEOUT, self.read_timeout))
        except requests.exceptions.RequestException as exc:
            raise NetworkError(f"{self.ref}: {method} failed: {short_error(exc)}",
                               hint="Check that the registry is running and reachable.") from None

    def request(self, method: str, path_or_url: str, *, headers: Optional[dict] = None, data=None,
                stream: bool = False, actions: str = "pull", ok: Tuple[int, ...] = (200,),
                rewind: Optional[Callable[[], object]] = None):
        """Send one request with the auth dance and (for GET/HEAD) redirects; return the
        response whose status is in `ok`, else raise NetworkError naming the registry.

        `data` may be a file object (streamed); `rewind` returns a fresh body when the
        request must be sent again after a 401 (None: no body to resend)."""
        url = path_or_url if "://" in path_or_url else self.base + path_or_url
        headers = dict(headers or {})
        r = self._raw(method, url, headers, data, stream)
        if r.status_code == 401:
            challenge = r.headers.get("WWW-Authenticate", "")
            r.close()
            self._authenticate(challenge, actions)
            if data is not None and rewind is None:
                raise NetworkError(f"{self.ref}: the registry asked for credentials in the middle of an upload")
            r = self._raw(method, url, headers, rewind() if rewind else None, stream)
            if r.status_code == 401:
                r.close()
                who = self._credentials()
                raise NetworkError(f"{self.ref}: the registry refused "
                                   + (f"the credentials of {who.source}" if who else "anonymous access"),
                                   hint="Log in (an auths entry in REGISTRY_AUTH_FILE, "
                                        "~/.config/containers/auth.json or ~/.docker/config.json).",
                                   exit_code=3)
        hops = 0
        while r.status_code in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
            hops += 1
            target = r.headers.get("Location")
            r.close()
            if not target or hops > MAX_REDIRECTS:
                raise NetworkError(f"{self.ref}: too many or empty redirects")
            url = urljoin(url, target)
            r = self._raw(method, url, headers, None, stream)  # Authorization only if still the registry
        if r.status_code not in ok:
            self._raise(method, url, r)
        return r

    def _raise(self, method: str, url: str, r):
        detail = ""
        try:
            if "json" in (r.headers.get("Content-Type") or ""):
                errs = json.loads(r.raw.read(16384, decode_content=True) or b"{}").get("errors") or []
                detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}"[:200]
                                   for e in errs[:3] if isinstance(e, dict))
        except Exception:  # noqa: BLE001 - the status line is the error; the body is a bonus
            detail = ""
        finally:
            r.close()
        path = urlsplit(url).path
        raise NetworkError(f"{self.ref}: {method} {path}: HTTP {r.status_code}" + (f" ({detail})" if detail else ""),
                           hint={404: "Not in that repository: check the reference.",
                                 403: "The account lacks permission for this repository."}.get(
                               r.status_code, "Check the registry's log."))

    def _authenticate(self, challenge: str, actions: str) -> None:
        scheme, params = parse_challenge(challenge)
        creds = self._credentials()
        if scheme == "basic":
            if creds is None:
                raise NetworkError(f"{self.ref}: the registry wants a login and no auth file has one for "
                                   f"{self.ref.host}",
                                   hint="Add an auths entry (e.g. `skopeo login` or `docker login` writes one).")
            self._authorization = creds.basic()
            return
        if scheme != "bearer" or not params.get("realm"):
            raise NetworkError(f"{self.ref}: unsupported authentication challenge {scheme or '(none)'!r}")
        self._authorization = "Bearer " + self._token(params, actions, creds)

    def _token(self, params: dict, actions: str, creds: Optional[Credentials]) -> str:
        import requests

        realm = params["realm"]
        check_url(realm, self.insecure, what=f"{self.ref} token realm")
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        query["scope"] = params.get("scope") or f"repository:{self.ref.repo}:{actions}"
        sep = "&" if urlsplit(realm).query else "?"
        url = realm + sep + urlencode(query)
        headers = {"Authorization": creds.basic()} if creds else {}
        try:
            r = self.session.get(url, headers=headers, allow_redirects=False, stream=True,
                                 timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        except requests.exceptions.RequestException as exc:
            raise NetworkError(f"{self.ref}: token service unreachable: {short_error(exc)}") from None
        with r:
            if r.status_code != 200:
                raise NetworkError(f"{self.ref}: the token service answered HTTP {r.status_code}"
                                   + (f" for the login of {creds.source}" if creds else " (anonymous)"),
                                   hint="Check the login in the auth file and its permissions on the repository.")
            try:
                doc = json.loads(r.raw.read(1 << 20, decode_content=True))
                token = doc.get("token") or doc.get("access_token")
            except (ValueError, AttributeError):
                token = None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n "):
            raise NetworkError(f"{self.ref}: the token service sent no usable token")
        return token

    # -- blobs --

    def blob_info(self, digest: Hash) -> Optional[BlobInfo]:
        """HEAD the blob: its size when the repository has it, None when it has not."""
        r = self.request("HEAD", f"/blobs/{_digest(digest)}", ok=(200, 404))
        r.close()
        if r.status_code == 404:
            return None
        length = r.headers.get("Content-Length")
        return BlobInfo(digest, int(length) if length and length.isdigit() else None)

    def pull_blob(self, digest: Hash, dest: Path, size: Optional[int] = None,
                  on_progress: Optional[Callable[[int], None]] = None) -> int:
        """Stream blob `digest` into `dest`, checked; resume a partial `dest` left by an
        earlier call (Range: bytes=N-, hashing the kept prefix first). Returns the bytes
        received now. On a digest or size mismatch `dest` is deleted and VerificationError
        names the registry."""
        if digest.algo != "sha256":
            raise UsageError(f"pull_blob verifies sha256 digests, got {digest.algo}")
        dest = Path(dest)
        hasher = hashlib.sha256()
        have = 0
        if dest.exists():
            with open(dest, "rb") as f:
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    hasher.update(block)
                    have += len(block)
            if size is not None and have > size:
                unlink_missing_ok(dest)
                hasher, have = hashlib.sha256(), 0
        if have and size is not None and have == size:
            if Hash("sha256", hasher.digest()) == digest:
                return 0  # an earlier call got it all
            unlink_missing_ok(dest)
            hasher, have = hashlib.sha256(), 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        r = self.request("GET", f"/blobs/{_digest(digest)}", headers=headers, stream=True, ok=(200, 206, 416))
        received = 0
        try:
            if r.status_code == 416 or (r.status_code == 206 and not _starts_at(r, have)) or r.status_code == 200:
                if have and r.status_code != 200:  # no usable range answer: start over plainly
                    r.close()
                    unlink_missing_ok(dest)
                    return self.pull_blob(digest, dest, size, on_progress)
                hasher, have = hashlib.sha256(), 0
                mode = "wb"
            else:
                mode = "ab"
            if r.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                raise NetworkError(f"{self.ref}: the blob came with a Content-Encoding; refusing it")
            dest.parent.mkdir(parents=True, exist_ok=True)
            limit = None if size is None else size - have + 1  # one byte past: catches a too-long body
            with open(dest, mode) as out:
                read = r.raw.read1 if hasattr(r.raw, "read1") else r.raw.read
                while limit is None or limit > 0:
                    try:
                        data = read(CHUNK if limit is None else min(CHUNK, limit), decode_content=False)
                    except Exception as exc:  # noqa: BLE001 - a cut: keep what arrived for the resume
                        raise NetworkError(f"{self.ref}: blob {digest.hex[:12]} cut after "
                                           f"{have + received} bytes: {short_error(exc)}",
                                           hint="Run the command again: it resumes.") from None
                    if not data:
                        break
                    out.write(data)
                    hasher.update(data)
                    received += len(data)
                    if limit is not None:
                        limit -= len(data)
                    if on_progress:
                        on_progress(len(data))
        finally:
            r.close()
        total = have + received
        got = Hash("sha256", hasher.digest())
        if (size is not None and total != size) or got != digest:
            unlink_missing_ok(dest)
            what = f"{total} bytes" + (f" (expected {size})" if size is not None and total != size else "")
            raise VerificationError(f"{self.ref}: blob {digest.hex} arrived as other bytes: sha256 {got.hex}, "
                                    f"{what}; deleted",
                                    hint="The registry holds corrupt or different data under that digest.")
        return received

    def push_blob(self, path: Path, digest: Hash, size: Optional[int] = None, chunk_size: int = DEFAULT_CHUNK,
                  on_progress: Optional[Callable[[int], None]] = None) -> bool:
        """Upload the file at `path` as blob `digest` unless the repository has it already
        (then False). Streamed: monolithic PUT of the open file, or PATCH chunks of
        `chunk_size`; the registry checks the digest, and so does the HEAD after."""
        path = Path(path)
        size = path.stat().st_size if size is None else size
        if self.blob_info(digest) is not None:
            return False
        r = self.request("POST", "/blobs/uploads/", headers={"Content-Length": "0"}, actions="pull,push", ok=(202,),
                         data=b"", rewind=lambda: b"")
        location = self._location(r)
        r.close()
        with open(path, "rb") as f:
            if chunk_size and chunk_size > 0:
                offset = 0
                while offset < size:
                    n = min(chunk_size, size - offset)
                    body = _Bounded(f, n, on_progress)
                    r = self.request("PATCH", location, data=body, actions="pull,push", ok=(202,),
                                     headers={"Content-Type": "application/octet-stream", "Content-Length": str(n),
                                              "Content-Range": f"{offset}-{offset + n - 1}"})
                    location = self._location(r)
                    r.close()
                    offset += n
                r = self.request("PUT", _with_digest(location, digest), data=b"", actions="pull,push",
                                 ok=(201,), headers={"Content-Length": "0"}, rewind=lambda: b"")
            else:
                body = _Bounded(f, size, on_progress)
                r = self.request("PUT", _with_digest(location, digest), data=body, actions="pull,push", ok=(201,),
                                 headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
            r.close()
        return True

    def _location(self, r) -> str:
        loc = r.headers.get("Location")
        if not loc:
            raise NetworkError(f"{self.ref}: the registry started an upload without a Location")
        url = urljoin(self.base + "/", loc)
        if not self._own(url):
            raise NetworkError(f"{self.ref}: the registry sent the upload elsewhere ({urlsplit(url).netloc}); refused")
        return url

    # -- manifests --

    def put_manifest(self, reference: str, body: bytes, media_type: str = OCI_MANIFEST) -> Hash:
        """PUT a manifest under a tag or its digest; returns its digest (checked against
        what the registry reports)."""
        _check_reference(reference)
        digest = Hash("sha256", hashlib.sha256(body).digest())
        r = self.request("PUT", f"/manifests/{reference}", data=body, rewind=lambda: body, actions="pull,push",
                         ok=(201,), headers={"Content-Type": media_type})
        reported = r.headers.get("Docker-Content-Digest")
        r.close()
        if reported and reported != _digest(digest):
            raise VerificationError(f"{self.ref}: the registry stored the manifest as {reported}, "
                                    f"not {_digest(digest)}")
        return digest

    def get_manifest(self, reference: str, accept: Iterable[str] = MANIFEST_TYPES) -> Tuple[bytes, str, Hash]:
        """(body, media type, digest) of a manifest; a digest reference is checked."""
        _check_reference(reference)
        r = self.request("GET", f"/manifests/{reference}", headers={"Accept": ", ".join(accept)}, stream=True)
        try:
            body = r.raw.read(MAX_MANIFEST + 1, decode_content=True)
        finally:
            r.close()
        if len(body) > MAX_MANIFEST:
            raise VerificationError(f"{self.ref}: manifest {reference} is over {MAX_MANIFEST} bytes; refused")
        digest = Hash("sha256", hashlib.sha256(body).digest())
        if reference.startswith("sha256:") and reference != _digest(digest):
            raise VerificationError(f"{self.ref}: manifest {reference} arrived as other bytes ({_digest(digest)})")
        media = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        if not media:
            try:
                media = json.loads(body).get("mediaType", "")
            except (ValueError, AttributeError):
                media = ""
        return body, media, digest


def _digest(h: Hash) -> str:
    return f"sha256:{h.hex}"


def _starts_at(r, offset: int) -> bool:
    m = re.match(r"\s*bytes\s+(\d+)-", r.headers.get("Content-Range") or "")
    return bool(m) and int(m.group(1)) == offset


def _with_digest(location: str, digest: Hash) -> str:
    return location + ("&" if urlsplit(location).query else "?") + "digest=" + quote(_digest(digest), safe="")


def _check_reference(reference: str) -> None:
    if not (_TAG_RE.match(reference) or re.match(r"^sha256:[0-9a-f]{64}$", reference)):
        raise UsageError(f"bad manifest reference {reference!r}", hint="A tag ([A-Za-z0-9_.-], up to 128) or sha256:HEX.")


def is_tag(text: str) -> bool:
    return bool(_TAG_RE.match(text))
