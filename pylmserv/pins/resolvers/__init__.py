"""Resolvers turn an intent (SourceSpec / ModelSpec) into a LockEntry.

One module per source type (github, git, url, hf) decides *what* to fetch (resolving
refs, reading the Hub API); one module per backend decides *how* to hash it:
  python  in-process (archive.extract + nar), the default
  nix     nix-prefetch-url [--unpack] / nix-prefetch-git, their output parsed
  fod     the empty-hash trick: a fixed-output derivation built by nix-build, the
          hash read back from Nix's mismatch message (pylmserv.nixmsg)
  auto    python, cross-checked with the nix tools when they are on PATH
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from ..config import LockEntry
from ...core.errors import PylmservError
from ...core.hashing import Hash

log = logging.getLogger("pylmserv.prefetch")

BACKENDS = ("auto", "python", "nix", "fod")


@dataclass(frozen=True)
class Fetch:
    """One thing to download and hash."""

    kind: str  # file (flat hash) | archive (unpack, NAR hash) | git (checkout, NAR hash)
    url: str  # as fetched (PYLMSERV_GITHUB_URL mirror already applied)
    name: str
    rev: Optional[str] = None  # git
    submodules: bool = False  # git
    headers: Dict[str, str] = field(default_factory=dict, repr=False)  # e.g. HF auth; never logged


@dataclass(frozen=True)
class Hashed:
    hash: Hash
    size: Optional[int] = None  # for files


@dataclass(frozen=True)
class Options:
    via: str = "auto"
    refresh: bool = False
    work: Path = Path(".")


def same_pin(locked: Optional[LockEntry], url: str, mode: str, rev: Optional[str], ident: dict, opts: Options) -> bool:
    """True when the locked entry already pins exactly this (no refetch needed)."""
    if opts.refresh or locked is None:
        return False
    return (locked.url == url and locked.mode == mode and locked.rev == rev
            and all(locked.extra.get(k) == v for k, v in ident.items()))


def hash_fetch(fetch: Fetch, opts: Options) -> Hashed:
    """Hash `fetch` with the chosen backend (auto: python, cross-checked by nix tools)."""
    from . import python

    if opts.via == "python":
        return python.hash_fetch(fetch, opts.work)
    if opts.via == "nix":
        from . import nix
        return nix.hash_fetch(fetch, opts.work)
    if opts.via == "fod":
        from . import fod
        return fod.hash_fetch(fetch, opts.work)
    result = python.hash_fetch(fetch, opts.work)
    from . import nix
    if nix.available(fetch) and not fetch.headers:  # nix tools cannot send auth headers
        try:
            other = nix.hash_fetch(fetch, opts.work)
        except PylmservError as exc:
            # Python already fetched it, so this is the local Nix setup (daemon, store
            # permissions), not the source: keep the result, say the check was skipped.
            log.warning("%s: not cross-checked, %s failed: %s", fetch.name, nix.tool_for(fetch), exc.message)
            return result
        nix.cross_check(fetch, result, other)  # a disagreement is an error
    return result
