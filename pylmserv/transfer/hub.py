"""The Hugging Face Hub API as pylmserv uses it: endpoint, token scoping, revision -> commit,
and file metadata (the LFS oid is the file's sha256) without downloading.

HF_ENDPOINT picks the Hub (a mirror, a test stand-in); HF_TOKEN authenticates and is sent
to that host only, never printed. Used by `pylmserv prefetch` (resolvers/hf.py) and by
`pylmserv fetch hf://...` (app/fetch_models.py), so both see the same Hub the same way; `parse_hf`
is the one reader of an `hf://` reference (fetch and `pylmserv add` use it).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple
from urllib.parse import quote, urlsplit

from ..core.errors import HubNotFound, NetworkError, UsageError  # noqa: F401
from ..core.hashing import Hash
from ..core.names import show
from ..core.record import Record, hash_by_value
from ..core.version import __version__
from .download import redact
from .http import bounded_json, refuse_credentials

HUB = "https://huggingface.co"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def parse_hf(item: str) -> Tuple[str, str, str]:
    """hf://org/repo/path/file.gguf[@revision] -> (org/repo, path, revision); revision
    defaults to main. Empty, `.`, `..` and backslashed path parts, and an empty revision
    after `@`, are refused."""
    body = item[len("hf://"):] if item.startswith("hf://") else item
    revision = "main"
    head, sep, tail = body.rpartition("@")
    if sep and "/" in head:
        body, revision = head, tail
    parts = body.split("/")
    if len(parts) < 3 or not revision or not all(p not in ("", ".", "..") and "\\" not in p for p in parts):
        raise UsageError(f"bad hf:// reference {show(repr(item))}",
                         hint="Use hf://ORG/REPO/PATH/FILE.gguf[@REVISION].")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def endpoint() -> str:
    return refuse_credentials((os.environ.get("HF_ENDPOINT") or HUB).rstrip("/"), "HF_ENDPOINT")


def auth_headers(url: str) -> Dict[str, str]:
    """Authorization for the Hub host only (download() also drops it on redirects)."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token and _origin(url) == _origin(endpoint()):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _origin(url: str) -> tuple:
    p = urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme)


def resolve_url(repo: str, revision: str, path: str, base: Optional[str] = None) -> str:
    """The one download URL of `path` in `repo` at `revision`, every part percent-encoded
    (a revision or file name with '?', '#', '%' or spaces stays one path segment)."""
    owner_repo = "/".join(quote(part, safe="") for part in repo.split("/"))
    return (f"{(base or endpoint()).rstrip('/')}/{owner_repo}/resolve/{quote(revision, safe='')}/"
            f"{quote(path, safe='/')}")


def on_endpoint(url: str) -> str:
    """Lock URLs name huggingface.co; HF_ENDPOINT (a mirror, a test stand-in) takes over."""
    base = endpoint()
    if base != HUB and url.startswith(HUB + "/"):
        return base + url[len(HUB):]
    return url


def api_json(method: str, path: str, what: str, data=None):
    """GET/POST `path` on the Hub API; errors name `what` and say how to fix them."""
    import requests


    url = endpoint() + path
    headers = {"User-Agent": f"pylmserv/{__version__}", **auth_headers(url)}
    try:
        resp = requests.request(method, url, data=data, headers=headers, timeout=(15, 60), stream=True)
    except requests.RequestException as exc:
        raise NetworkError(f"{what}: cannot reach the Hugging Face Hub at {endpoint()}: {type(exc).__name__}",
                           hint="Check the network, or set HF_ENDPOINT to a reachable mirror.") from None
    if resp.status_code in (401, 403):
        raise NetworkError(f"{what}: the Hub refused access (HTTP {resp.status_code} from {redact(url)})",
                           hint="The repository is gated or private: set HF_TOKEN to a token with access.")
    if resp.status_code == 404:
        raise HubNotFound(f"{what}: HTTP 404 from {redact(url)}", hint="Check the repository name and revision.")
    if resp.status_code >= 400:
        raise NetworkError(f"{what}: HTTP {resp.status_code} from {redact(url)}", hint="Try again later.")
    try:
        return bounded_json(resp, what, redact(url))
    except ValueError:
        raise NetworkError(f"{what}: {redact(url)} did not answer JSON (a proxy page?)",
                           hint="Check proxy settings and HF_ENDPOINT.") from None


def _repo_path(repo: str) -> str:
    return "/".join(quote(part, safe="") for part in repo.split("/"))


def resolve_commit(repo: str, revision: str, what: str) -> str:
    """A branch or tag -> its commit; a full commit id is returned as is."""
    if _COMMIT.match(revision):
        return revision
    try:
        data = api_json("GET", f"/api/models/{_repo_path(repo)}/revision/{quote(revision, safe='')}", what)
    except HubNotFound:
        raise UsageError(f"{what}: {repo} has no revision {revision!r} (or the repository does not exist)",
                         hint="Fix the repository name or revision.") from None
    sha = data.get("sha") if isinstance(data, dict) else None
    if not isinstance(sha, str) or not _COMMIT.match(sha):
        raise NetworkError(f"{what}: the Hub did not resolve revision {revision!r} of {repo}",
                           hint="Check the revision name.")
    return sha


class HubFile(Record):  # a Record, not a dataclass: `fetch` imports this module (~4 M instructions a dataclass)
    """What the Hub says about one file: its size and, for LFS files, its sha256."""

    __slots__ = ("path", "size", "sha256")
    path: str
    size: Optional[int]
    sha256: Optional[Hash]  # None: a plain git file (the Hub publishes only a git blob id)

    __hash__ = hash_by_value


_INT64 = 2 ** 63 - 1


def hub_file(item: dict, what: str) -> HubFile:
    """The one reading of the Hub's metadata for a file (paths-info or tree item). A
    malformed answer is refused, never guessed at: its values go into the lock."""
    path = item.get("path")
    lfs = item.get("lfs")
    if lfs is not None and not isinstance(lfs, dict):
        raise NetworkError(f"{what}: the Hub answered malformed LFS metadata for {path!r}",
                           hint="Check HF_ENDPOINT: it must be a Hugging Face Hub (or a faithful mirror).")
    lfs = lfs or {}
    oid = lfs.get("oid") or lfs.get("sha256")
    sha = None
    if oid is not None:
        if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise NetworkError(f"{what}: the Hub's LFS oid for {path!r} is not a sha256 ({str(oid)[:80]!r})",
                               hint="Check HF_ENDPOINT: it must be a Hugging Face Hub (or a faithful mirror).")
        sha = Hash("sha256", bytes.fromhex(oid))
    size = lfs.get("size", item.get("size")) if lfs else item.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _INT64):
        raise NetworkError(f"{what}: the Hub's size for {path!r} is not a byte count ({str(size)[:80]!r})",
                           hint="Check HF_ENDPOINT: it must be a Hugging Face Hub (or a faithful mirror).")
    return HubFile(path, size, sha)


def files_at(repo: str, commit: str, paths: List[str], what: str) -> Optional[Dict[str, HubFile]]:
    """HubFile for each of `paths` at `commit`; None when the Hub has no metadata API (the
    caller then downloads and hashes). A path the Hub does not list is a UsageError (exit
    2) for prefetch and fetch alike."""
    info = file_info(repo, commit, paths, what)
    if info is None:
        return None
    out = {}
    for p in paths:
        if p not in info:
            raise UsageError(f"{what}: {p!r} not found in {repo} at {commit[:12]}",
                             hint="Fix `file` (or `revision`): check the repository's file list on the Hub.")
        out[p] = hub_file(info[p], what)
    return out


def file_info(repo: str, commit: str, paths: List[str], what: str) -> Optional[Dict[str, dict]]:
    """Metadata of `paths` at `commit` ({path: {"size", "lfs": {"oid", "size"}}}), from
    paths-info, else the tree listing; None when the Hub offers neither endpoint."""
    try:
        items = api_json("POST", f"/api/models/{_repo_path(repo)}/paths-info/{commit}", what,
                         data={"paths": paths, "expand": "true"})
    except NetworkError:
        items = _tree_items(repo, commit, paths, what)
        if items is None:
            return None
    if not isinstance(items, list):
        raise NetworkError(f"{what}: unexpected paths-info answer from the Hub")
    return {i.get("path"): i for i in items
            if isinstance(i, dict) and i.get("type", "file") == "file" and i.get("path") in paths}


def _tree_items(repo: str, commit: str, paths: List[str], what: str) -> Optional[list]:
    items = []
    for folder in sorted({p.rsplit("/", 1)[0] if "/" in p else "" for p in paths}):
        try:
            listing = api_json("GET", f"/api/models/{_repo_path(repo)}/tree/{commit}"
                               + (f"/{quote(folder)}" if folder else ""), what)
        except NetworkError:
            return None
        items.extend(listing if isinstance(listing, list) else [])
    return items
