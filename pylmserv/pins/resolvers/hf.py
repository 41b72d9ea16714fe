"""[models.NAME] hf = "org/repo", file, revision: sha256 and size from the Hub API.

The revision (branch or tag) is resolved to a commit (/api/models/R/revision/REV), then
/api/models/R/paths-info/COMMIT gives the LFS object id (= sha256 of the file) and size
without downloading. Files kept in plain git (no lfs) and Hubs without these endpoints
fall back to the `tree` listing, then to download + hash. HF_ENDPOINT picks the Hub,
HF_TOKEN authenticates; the token is sent only to that endpoint and never printed.
"""
from __future__ import annotations

import logging
from typing import Optional

from ...transfer import hub
from ..config import LockEntry
from ...core.errors import UsageError, VerificationError
from ...core.hashing import Hash
from . import hash_fetch
from .base import Fetch, Hashed
from .url import check_published

log = logging.getLogger("pylmserv.prefetch")


def resolve(spec, locked, opts) -> LockEntry:
    base = hub.endpoint()
    ident = {"hf": spec.hf, "file": spec.file}
    commit = hub.resolve_commit(spec.hf, spec.revision, spec.name)
    url = spec.resolve_url(base, commit)
    if (not opts.refresh and locked is not None and locked.rev == commit and locked.url == url
            and all(locked.extra.get(k) == v for k, v in ident.items())):
        return LockEntry("models", spec.name, url, locked.hash, "flat", rev=commit, size=locked.size, extra=ident)
    got = _from_api(spec, commit) if opts.via in ("auto", "python") else None
    if got is None:
        got = hash_fetch(Fetch("file", url, spec.name, headers=hub.auth_headers(url)), opts)
    check_published(spec.name, url, spec.sha256, got.hash)
    if spec.size is not None and got.size is not None and got.size != spec.size:
        raise VerificationError(f"{spec.name}: the Hub says {got.size} bytes, pylmserv.toml says {spec.size}",
                                hint="Fix size in pylmserv.toml if the file changed on purpose.")
    return LockEntry("models", spec.name, url, got.hash, "flat", rev=commit, size=got.size, extra=ident)


def _from_api(spec, commit: str) -> Optional[Hashed]:
    """sha256 + size from the Hub's metadata; None if it only has a git blob id (or no API)."""
    info = hub.file_info(spec.hf, commit, [spec.file], spec.name)
    if info is None:
        log.debug("%s: no Hub metadata endpoint answered; downloading", spec.name)
        return None
    item = info.get(spec.file)
    if item is None:
        raise UsageError(f"{spec.name}: {spec.file!r} not found in {spec.hf} at {commit[:12]}",
                         hint="Fix `file` (or `revision`) in pylmserv.toml.")
    lfs = item.get("lfs") or {}
    if not lfs.get("oid"):
        log.info("%s: %s is not an LFS file; hashing a download", spec.name, spec.file)
        return None
    size = lfs.get("size", item.get("size"))
    return Hashed(Hash.parse(lfs["oid"], algo="sha256"), int(size) if size is not None else None)
