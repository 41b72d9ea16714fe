"""[sources.NAME] type = "github": tag/branch -> commit, then the archive tarball that
fetchFromGitHub hashes (NAR of the unpacked tree), or a git checkout with submodules.

PYLMSERV_GITHUB_URL (e.g. http://127.0.0.1:PORT) replaces https://github.com for both
the archive and the git URL when fetching; the lock always records github.com URLs.
"""
from __future__ import annotations

from ...store.trees import mirror_url
from ..drift import reusable
from ..lock import GithubPin, LockEntry
from . import hash_fetch
from .base import Fetch
from .git import _meta, fetcher_for, resolve_ref


def resolve(spec, locked, opts) -> LockEntry:
    rev = resolve_ref(mirror_url(spec.git_url), spec.ref)
    url = spec.git_url if spec.submodules else spec.archive_url(rev)
    ident = dict(url=url, rev=rev, owner=spec.owner, repo=spec.repo, git_url=spec.git_url,
                 submodules=spec.submodules, fetcher=fetcher_for(opts.via, True) if spec.submodules else None)
    common = dict(kind="sources", name=spec.name, ref=spec.ref, **ident, **_meta(spec))
    if reusable(locked, GithubPin, opts.refresh, **ident):
        return GithubPin(hash=locked.hash, **common)
    if spec.submodules:
        fetch = Fetch("git", mirror_url(url), spec.name, rev=rev, submodules=True)
    else:
        fetch = Fetch("archive", mirror_url(url), spec.name)
    got = hash_fetch(fetch, opts)
    if spec.submodules and got.fetcher:
        common["fetcher"] = got.fetcher
    return GithubPin(hash=got.hash, **common)
