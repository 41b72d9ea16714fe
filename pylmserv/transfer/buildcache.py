"""Where shared builds are kept: a substituter is anything that can hand back a blob by its
sha256 and a small manifest by name. Nothing here is trusted: the builders check the
manifest's signature and every blob's hash (builders/substitute.py).

  file:///DIR or DIR   a directory (push writes it; serve it with any static HTTP server)
  http(s)://BASE       the same layout read over HTTP: BASE/sha256/<hex> (the content-addressed
                       mirror layout) and BASE/pylmserv-builds/<key>.json
  oci://HOST/REPO      an OCI registry (transfer/oci.py): the manifest is an
                       artifact tagged with the key, each file a layer whose digest is its sha256

Each kind implements the same four calls (`get_manifest`, `put_manifest`, `get_blob`,
`put_blob`), so a new kind is one class.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

from ..core.errors import NetworkError, UsageError, VerificationError
from ..core.fsutil import atomic_write_bytes
from ..core.hashing import Hash
from .http import redact, short_error, transient_errors
from .oci import OciRef, Registry

MANIFEST_DIR = "pylmserv-builds"
MAX_MANIFEST = 1 << 20  # a manifest lists a few dozen files: a bigger answer is a liar
_HEX = re.compile(r"[0-9a-f]{64}")


def _check_hex(hexdigest: str) -> str:
    if not _HEX.fullmatch(hexdigest or ""):
        raise VerificationError(f"not a sha256 hex digest: {hexdigest!r}")
    return hexdigest


def _check_key(key: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{16,64}", key or ""):
        raise UsageError(f"not a build cache key: {key!r}")
    return key


def _bounded(body: bytes, where: str) -> bytes:
    if len(body) > MAX_MANIFEST:
        raise VerificationError(f"{where}: a manifest of over {MAX_MANIFEST} bytes; refused unread")
    return body


def copy_hashed(src, dest: Path, hexdigest: str, size: Optional[int], what: str) -> None:
    """Stream `src` (a binary file object) to `dest`, hashing; VerificationError (and no
    `dest`) when the bytes are not the ones named."""
    h = hashlib.sha256()
    n = 0
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as out:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                n += len(chunk)
                if size is not None and n > size:
                    raise VerificationError(f"{what}: more than the {size} bytes signed")
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != hexdigest or (size is not None and n != size):
            raise VerificationError(f"{what}: bytes do not match the signed sha256 {hexdigest} "
                                    f"(got sha256 {h.hexdigest()}, {n} bytes)")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


class BuildCache:
    """The interface every substituter kind implements."""

    url = ""

    def get_manifest(self, key: str) -> Optional[bytes]:
        """The manifest stored under `key`, or None when this cache has none."""
        raise NotImplementedError

    def put_manifest(self, key: str, body: bytes) -> None:
        raise NotImplementedError

    def get_blob(self, hexdigest: str, dest: Path, size: Optional[int] = None, what: str = "") -> None:
        """Write the blob to `dest`, checked against `hexdigest` (and `size`)."""
        raise NotImplementedError

    def put_blob(self, hexdigest: str, path: Path) -> None:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.url


class DirectoryCache(BuildCache):
    """A directory: sha256/<hex> and pylmserv-builds/<key>.json."""

    def __init__(self, root: Path, url: str = ""):
        self.root = Path(root)
        self.url = url or str(root)

    def get_manifest(self, key: str) -> Optional[bytes]:
        path = self.root / MANIFEST_DIR / f"{_check_key(key)}.json"
        try:
            with open(path, "rb") as fh:
                return _bounded(fh.read(MAX_MANIFEST + 1), str(path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise NetworkError(f"{self.url}: cannot read {path}: {exc.strerror}") from None

    def put_manifest(self, key: str, body: bytes) -> None:
        atomic_write_bytes(self.root / MANIFEST_DIR / f"{_check_key(key)}.json", body)

    def get_blob(self, hexdigest: str, dest: Path, size: Optional[int] = None, what: str = "") -> None:
        path = self.root / "sha256" / _check_hex(hexdigest)
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise NetworkError(f"{self.url}: no blob sha256:{hexdigest} ({exc.strerror})") from None
        with fh:
            copy_hashed(fh, dest, hexdigest, size, what or f"{self.url} sha256:{hexdigest}")

    def put_blob(self, hexdigest: str, path: Path) -> None:
        dest = self.root / "sha256" / _check_hex(hexdigest)
        if dest.is_file() and dest.stat().st_size == Path(path).stat().st_size:
            return  # content-addressed: the same name is the same bytes
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        import shutil

        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)


class HttpCache(BuildCache):
    """The directory layout read over HTTP (read-only: push to a directory the server serves)."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.url = redact(self.base)
        self._session = None

    def _get(self, url: str, stream: bool):
        import requests  # lazy: ~0.15 s that builds without substituters never pay

        if self._session is None:
            self._session = requests.Session()
            self._session.headers["Accept-Encoding"] = "identity"
        try:
            return self._session.get(url, stream=stream, timeout=(10, 60), allow_redirects=True)
        except requests.RequestException as exc:
            raise NetworkError(f"{redact(url)}: {short_error(exc)}") from None

    def get_manifest(self, key: str) -> Optional[bytes]:
        url = f"{self.base}/{MANIFEST_DIR}/{_check_key(key)}.json"
        r = self._get(url, stream=True)
        with r:
            if r.status_code == 404:
                return None
            if r.status_code != 200:
                raise NetworkError(f"{redact(url)}: HTTP {r.status_code}")
            try:
                body = r.raw.read(MAX_MANIFEST + 1, decode_content=True)
            except transient_errors() as exc:
                raise NetworkError(f"{redact(url)}: {short_error(exc)}") from None
        return _bounded(body, url)

    def put_manifest(self, key: str, body: bytes) -> None:
        raise UsageError(f"{self.url}: an HTTP cache is read-only here",
                         hint="Push to the directory the HTTP server serves (--to DIR), or to an oci:// registry.")

    put_blob = put_manifest  # type: ignore[assignment]

    def get_blob(self, hexdigest: str, dest: Path, size: Optional[int] = None, what: str = "") -> None:
        url = f"{self.base}/sha256/{_check_hex(hexdigest)}"
        r = self._get(url, stream=True)
        with r:
            if r.status_code != 200:
                raise NetworkError(f"{redact(url)}: HTTP {r.status_code}")
            r.raw.decode_content = True
            try:
                copy_hashed(r.raw, dest, hexdigest, size, what or redact(url))
            except transient_errors() as exc:  # a cut, a timeout: one line, never a traceback
                raise NetworkError(f"{redact(url)}: {short_error(exc)}") from None


def open_cache(url: str) -> BuildCache:
    """A substituter from its URL (file:///DIR, a plain directory path, http(s)://, oci://)."""
    text = str(url).strip()
    parts = urlsplit(text)
    if parts.scheme in ("http", "https"):
        if parts.username or parts.password:
            raise UsageError("a substituter URL must not carry credentials",
                             hint="Put registry credentials in the container auth files, never in the config.")
        return HttpCache(text)
    if parts.scheme == "file":
        return DirectoryCache(Path(unquote(parts.path)), text)
    if parts.scheme == "oci":
        return oci_cache(text[len("oci://"):])
    if parts.scheme == "" and text:
        return DirectoryCache(Path(text).expanduser(), text)
    raise UsageError(f"unsupported substituter {text!r}",
                     hint="Use file:///DIR, a directory path, http(s)://BASE or oci://HOST/REPO.")


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BUILD_MANIFEST_TYPE = "application/vnd.pylmserv.build.manifest.v1+json"
LAYER_TYPE = "application/octet-stream"
TITLE = "org.opencontainers.image.title"


class OciCache(BuildCache):
    """A repository of an OCI registry (`registry`: transfer/oci.py's Registry, or anything
    with its get_manifest/put_manifest/pull_blob/push_blob). A build is an artifact tagged with
    its cache key: the signed pylmserv manifest is its config blob, each file a raw layer
    whose digest is the file's sha256 (titled with its name), so any registry stores it and
    `skopeo inspect` shows it."""

    def __init__(self, registry, url: str):
        self.registry = registry
        self.url = url

    def get_manifest(self, key: str) -> Optional[bytes]:
        try:
            body, _media, _digest = self.registry.get_manifest(_check_key(key))
        except NetworkError as exc:
            if "HTTP 404" in exc.message:
                return None
            raise
        try:
            config = json.loads(body)["config"]
            if config.get("mediaType") != BUILD_MANIFEST_TYPE:
                raise ValueError(config.get("mediaType"))
            algo, _, hexdigest = str(config["digest"]).partition(":")
            size = int(config["size"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise VerificationError(f"{self.url}:{key}: not a pylmserv build artifact") from None
        if algo != "sha256" or size > MAX_MANIFEST:
            raise VerificationError(f"{self.url}:{key}: its config is not a pylmserv build manifest")
        import tempfile  # lazy: stdlib modules the up-to-date build path never needs

        with tempfile.TemporaryDirectory(prefix="pylmserv-oci-") as tmp:
            dest = Path(tmp) / "manifest.json"
            self.get_blob(_check_hex(hexdigest), dest, size, what=f"{self.url}:{key} manifest")
            return dest.read_bytes()

    def put_manifest(self, key: str, body: bytes) -> None:
        files = json.loads(body)["files"]
        config = Hash.of_bytes(body)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="pylmserv-oci-") as tmp:
            path = Path(tmp) / "manifest.json"
            path.write_bytes(body)
            self.registry.push_blob(path, config, len(body))
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": BUILD_MANIFEST_TYPE,
               "config": {"mediaType": BUILD_MANIFEST_TYPE, "digest": f"sha256:{config.hex}", "size": len(body)},
               "layers": [{"mediaType": LAYER_TYPE, "digest": f"sha256:{f['sha256']}", "size": f["size"],
                           "annotations": {TITLE: f["name"]}} for f in files]}
        self.registry.put_manifest(_check_key(key), json.dumps(doc, sort_keys=True).encode(), OCI_MANIFEST)

    def get_blob(self, hexdigest: str, dest: Path, size: Optional[int] = None, what: str = "") -> None:
        self.registry.pull_blob(Hash("sha256", bytes.fromhex(_check_hex(hexdigest))), dest, size)

    def put_blob(self, hexdigest: str, path: Path) -> None:
        self.registry.push_blob(Path(path), Hash("sha256", bytes.fromhex(_check_hex(hexdigest))),
                                Path(path).stat().st_size)


def oci_cache(ref: str) -> BuildCache:
    return OciCache(Registry(OciRef.parse("oci://" + ref)), "oci://" + ref)
