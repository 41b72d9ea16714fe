"""What resolvers and hashing backends pass each other: a Fetch, its Hashed result, Options."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from ...core.hashing import Hash

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
    fetcher: Optional[str] = None  # git: the Nix fetcher whose tree this is the NAR hash of


@dataclass(frozen=True)
class Options:
    via: str = "auto"
    refresh: bool = False
    work: Path = Path(".")
