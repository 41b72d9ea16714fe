"""What resolvers and hashing backends pass each other: a Fetch, its Hashed result, Options."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from ...core.hashing import Hash
from ..config import LockEntry

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
