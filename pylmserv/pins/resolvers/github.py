"""[sources.NAME] type = "github": tag/branch -> commit, then the archive tarball that
fetchFromGitHub hashes (NAR of the unpacked tree), or a git checkout with submodules.

PYLMSERV_GITHUB_URL (e.g. http://127.0.0.1:PORT) replaces https://github.com for both
the archive and the git URL when fetching; the lock always records github.com URLs.
"""
from __future__ import annotations

from ..config import LockEntry
from ...store.trees import mirror_url
from . import hash_fetch
from .base import Fetch, same_pin
from .git import _meta, resolve_ref


def resolve(spec, locked, opts) -> LockEntry:
    rev = resolve_ref(mirror_url(spec.git_url), spec.ref)
    ident = {"type": "github", "owner": spec.owner, "repo": spec.repo, "submodules": spec.submodules}
    extra = dict(ident, ref=spec.ref, **_meta(spec))
    url = spec.git_url if spec.submodules else spec.archive_url(rev)
    if same_pin(locked, url, "nar", rev, ident, opts):
        return LockEntry("sources", spec.name, url, locked.hash, "nar", rev=rev, extra=extra)
    if spec.submodules:
        fetch = Fetch("git", mirror_url(url), spec.name, rev=rev, submodules=True)
    else:
        fetch = Fetch("archive", mirror_url(url), spec.name)
    got = hash_fetch(fetch, opts)
    return LockEntry("sources", spec.name, url, got.hash, "nar", rev=rev, extra=extra)
