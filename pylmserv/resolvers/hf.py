"""[models.NAME] hf = "org/repo", file, revision: sha256 and size from the Hub API.

The revision (branch or tag) is resolved to a commit (/api/models/R/revision/REV), then
/api/models/R/paths-info/COMMIT gives the LFS object id (= sha256 of the file) and size
without downloading. Files kept in plain git (no lfs) and Hubs without these endpoints
fall back to the `tree` listing, then to download + hash. HF_ENDPOINT picks the Hub,
HF_TOKEN authenticates; the token is sent only to that endpoint and never printed.
"""
from __future__ import annotations

import logging
import os
from typing import Optional
from urllib.parse import quote

from ..config import LockEntry
from ..errors import NetworkError, UsageError, VerificationError
from ..hashing import Hash
from . import Fetch, Hashed, hash_fetch
from .git import SHA_RE
from .url import check_published

log = logging.getLogger("pylmserv.prefetch")
DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def auth_headers() -> dict:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def resolve(spec, locked, opts) -> LockEntry:
    base = endpoint()
    ident = {"hf": spec.hf, "file": spec.file}
    if SHA_RE.match(spec.revision):
        commit = spec.revision
    else:
        commit = _api(base, f"/api/models/{spec.hf}/revision/{quote(spec.revision, safe='')}", spec)["sha"]
    url = spec.resolve_url(base, commit)
    if (not opts.refresh and locked is not None and locked.rev == commit and locked.url == url
            and all(locked.extra.get(k) == v for k, v in ident.items())):
        return LockEntry("models", spec.name, url, locked.hash, "flat", rev=commit, size=locked.size, extra=ident)
    got = _from_api(base, spec, commit) if opts.via in ("auto", "python") else None
    if got is None:
        got = hash_fetch(Fetch("file", url, spec.name, headers=auth_headers()), opts)
    check_published(spec.name, url, spec.sha256, got.hash)
    if spec.size is not None and got.size is not None and got.size != spec.size:
        raise VerificationError(f"{spec.name}: the Hub says {got.size} bytes, pylmserv.toml says {spec.size}",
                                hint="Fix size in pylmserv.toml if the file changed on purpose.")
    return LockEntry("models", spec.name, url, got.hash, "flat", rev=commit, size=got.size, extra=ident)


def _from_api(base: str, spec, commit: str) -> Optional[Hashed]:
    """sha256 + size from paths-info (then tree); None if the Hub only has a git blob id."""
    item = None
    try:
        items = _api(base, f"/api/models/{spec.hf}/paths-info/{commit}", spec,
                     data={"paths": [spec.file], "expand": "true"})
        item = next((i for i in items if i.get("path") == spec.file), None)
    except NetworkError as exc:
        log.debug("%s: paths-info unavailable (%s); trying tree", spec.name, exc.message)
    if item is None:
        folder = spec.file.rsplit("/", 1)[0] if "/" in spec.file else ""
        try:
            items = _api(base, f"/api/models/{spec.hf}/tree/{commit}" + (f"/{folder}" if folder else ""), spec)
            item = next((i for i in items if i.get("path") == spec.file), None)
        except NetworkError as exc:
            log.debug("%s: tree unavailable (%s); downloading", spec.name, exc.message)
            return None
        if item is None:
            raise UsageError(f"{spec.name}: {spec.file!r} not found in {spec.hf} at {commit[:12]}",
                             hint="Fix `file` (or `revision`) in pylmserv.toml.")
    lfs = item.get("lfs") or {}
    if not lfs.get("oid"):
        log.info("%s: %s is not an LFS file; hashing a download", spec.name, spec.file)
        return None
    size = lfs.get("size", item.get("size"))
    return Hashed(Hash.parse(lfs["oid"], algo="sha256"), int(size) if size is not None else None)


def _api(base: str, path: str, spec, data=None):
    import requests

    url = base + path
    try:
        if data is None:
            resp = requests.get(url, headers=auth_headers(), timeout=(15, 60))
        else:
            resp = requests.post(url, headers=auth_headers(), data=data, timeout=(15, 60))
    except requests.RequestException as exc:
        raise NetworkError(f"{spec.name}: cannot reach the Hugging Face Hub at {base}: {type(exc).__name__}",
                           hint="Check the network, or HF_ENDPOINT.") from None
    if resp.status_code in (401, 403):
        raise NetworkError(f"{spec.name}: the Hub refused access to {spec.hf} (HTTP {resp.status_code})",
                           hint="Set HF_TOKEN to a token that can read this repo (gated or private).")
    if resp.status_code == 404 and "/revision/" in path:
        raise UsageError(f"{spec.name}: {spec.hf} has no revision {spec.revision!r} (or the repo does not exist)",
                         hint="Fix `hf` / `revision` in pylmserv.toml.")
    if resp.status_code >= 400:
        raise NetworkError(f"{spec.name}: HTTP {resp.status_code} from {url}")
    try:
        return resp.json()
    except ValueError:
        raise NetworkError(f"{spec.name}: the Hub answered {url} with something that is not JSON") from None
