"""git sources: the commit a ref names (git ls-remote), the NAR hash of its checkout.

The transport (ls-remote, checkout without .git) is transfer/git.py. The pin records
which Nix fetcher its hash is for (`fetcher`): Nix 2.8's builtins.fetchGit exports the
commit without submodules (export-ignore files dropped), nixpkgs' fetchgit keeps them.
"""
from __future__ import annotations

from ...transfer.git import resolve_ref
from ..drift import reusable
from ..lock import GitPin
from . import hash_fetch
from .base import Fetch


def fetcher_for(via: str, submodules: bool) -> str:
    """The Nix fetcher whose tree a backend hashes for a git pin (with submodules both
    fetchers give one tree: the builtin one, which needs no nixpkgs, is named)."""
    return "fetchgit" if via == "nix" and not submodules else "builtins.fetchGit"


def resolve(spec, locked, opts):
    """[sources.NAME] type = "git": commit from ls-remote, NAR hash of the checkout."""
    rev = resolve_ref(spec.url, spec.ref)
    ident = dict(url=spec.url, git_url=spec.url, rev=rev, submodules=spec.submodules,
                 fetcher=fetcher_for(opts.via, spec.submodules))
    common = dict(kind="sources", name=spec.name, ref=spec.ref, **ident, **_meta(spec))
    if reusable(locked, GitPin, opts.refresh, **ident):
        return GitPin(hash=locked.hash, **common)
    got = hash_fetch(Fetch("git", spec.url, spec.name, rev=rev, submodules=spec.submodules), opts)
    return GitPin(hash=got.hash, **{**common, "fetcher": got.fetcher or common["fetcher"]})


def _meta(spec) -> dict:
    """Pass-through keys from the config that builders read (version, cosmocc)."""
    return {k: spec.meta[k] for k in ("version", "cosmocc") if k in spec.meta}
