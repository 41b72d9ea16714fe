"""Where pylmserv keeps things. One home ($PYLMSERV_HOME, else the user cache dir).

Layout (every module uses these helpers, never its own paths):
  blobs/sha256/<hex>        content-addressed files (models, flat sources)
  models/<name>             named entries -> blobs (hardlink, symlink or copy)
  sources/<nix32>-<name>    verified unpacked source trees, keyed by NAR hash
  toolchains/<name>-<ver>   unpacked toolchains (cosmocc)
  builds/<key>              build directories, keyed by (source hash, backend, options)
  bin/<engine>-<backend>    installed binaries (`current` links per backend)
  tmp/                      partial downloads and staging (same filesystem: os.replace)
"""
from __future__ import annotations

import os
from pathlib import Path

CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by pylmserv.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


def home() -> Path:
    env = os.environ.get("PYLMSERV_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        import platformdirs

        root = Path(platformdirs.user_cache_dir("pylmserv", appauthor=False))
    return root


def ensure_home(root: Path | None = None) -> Path:
    root = root or home()
    root.mkdir(parents=True, exist_ok=True)
    tag = root / "CACHEDIR.TAG"
    if not tag.exists():
        from ..core.fsutil import atomic_write_text

        atomic_write_text(tag, CACHEDIR_TAG)
    return root


def subdir(name: str, root: Path | None = None) -> Path:
    path = ensure_home(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path
