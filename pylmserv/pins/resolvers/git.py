"""git sources: the commit a ref names (git ls-remote), the NAR hash of its checkout.

The transport (ls-remote, checkout without .git) is transfer/git.py.
"""
from __future__ import annotations

from ...transfer.git import resolve_ref
from ..config import LockEntry
from . import hash_fetch
from .base import Fetch, same_pin


def resolve(spec, locked, opts):
    """[sources.NAME] type = "git": commit from ls-remote, NAR hash of the checkout."""
    rev = resolve_ref(spec.url, spec.ref)
    ident = {"type": "git", "submodules": spec.submodules}
    extra = dict(ident, ref=spec.ref, **_meta(spec))
    if same_pin(locked, spec.url, "nar", rev, ident, opts):
        return LockEntry("sources", spec.name, locked.url, locked.hash, "nar", rev=rev, extra=extra)
    got = hash_fetch(Fetch("git", spec.url, spec.name, rev=rev, submodules=spec.submodules), opts)
    return LockEntry("sources", spec.name, spec.url, got.hash, "nar", rev=rev, extra=extra)


def _meta(spec) -> dict:
    """Pass-through keys from the config that builders read (version, cosmocc)."""
    return {k: v for k, v in spec.meta.items() if k != "description"}
