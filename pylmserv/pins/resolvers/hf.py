"""[models.NAME] hf = "org/repo", file, revision: sha256 and size from the Hub API.

The revision (branch or tag) is resolved to a commit, then the Hub's file metadata
(transfer.hub: paths-info, else the tree listing) gives the LFS object id (= sha256 of
the file) and size without downloading; the other files of a GGUF split set are pinned
with it (`shards`). Files kept in plain git (no LFS) and Hubs without a metadata API fall
back to download + hash. HF_ENDPOINT picks the Hub, HF_TOKEN authenticates; the token is
sent only to that endpoint and never printed.
"""
from __future__ import annotations

from ...core.errors import VerificationError
from ...core.gguf import split_names
from ...core.log import get_logger
from ...transfer import hub
from ..drift import reusable
from ..lock import HfPin, LockEntry, Shard
from . import hash_fetch
from .base import Fetch, Hashed
from .url import check_published

log = get_logger("pylmserv.prefetch")


def resolve(spec, locked, opts) -> LockEntry:
    commit = hub.resolve_commit(spec.hf, spec.revision, spec.name)
    url = hub.resolve_url(spec.hf, commit, spec.file)
    directory = spec.file.rsplit("/", 1)[0] + "/" if "/" in spec.file else ""
    others = [directory + n for n in split_names(spec.file) if directory + n != spec.file]
    ident = dict(url=url, rev=commit, hf=spec.hf, file=spec.file, revision=spec.revision)
    if reusable(locked, HfPin, opts.refresh, **ident) and len(locked.shards) == len(others):
        return locked
    meta = hub.files_at(spec.hf, commit, [spec.file, *others], spec.name) if opts.via in ("auto", "python") else None
    if meta is None and opts.via in ("auto", "python"):
        log.info("%s: the Hub offers no file metadata API; downloading to hash", spec.name)
    got = _hashed(spec.name, spec.hf, commit, spec.file, meta, opts)
    check_published(spec.name, url, spec.sha256, got.hash)
    if spec.size is not None and got.size is not None and got.size != spec.size:
        raise VerificationError(f"{spec.name}: the Hub says {got.size} bytes, pylmserv.toml says {spec.size}",
                                hint="Fix size in pylmserv.toml if the file changed on purpose.")
    shards = []
    for path in others:
        h = _hashed(f"{spec.name} ({path})", spec.hf, commit, path, meta, opts)
        shards.append(Shard(path.rsplit("/", 1)[-1], hub.resolve_url(spec.hf, commit, path), h.hash, h.size))
    return HfPin(kind="models", name=spec.name, hash=got.hash, size=got.size, shards=tuple(shards), **ident)


def _hashed(what: str, repo: str, commit: str, path: str, meta, opts) -> Hashed:
    """The Hub's LFS sha256 when it publishes one, else a download hashed."""
    info = meta.get(path) if meta else None
    if info is not None and info.sha256 is not None:
        return Hashed(info.sha256, info.size)
    if info is not None:
        log.info("%s: %s is not an LFS file; hashing a download", what, path)
    url = hub.resolve_url(repo, commit, path)
    return hash_fetch(Fetch("file", url, what, headers=hub.auth_headers(url)), opts)
