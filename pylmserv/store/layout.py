"""Where pylmserv keeps things. One home ($PYLMSERV_HOME, else the user cache dir).

Layout (every module uses these helpers, never its own paths):
  blobs/sha256/<hex>        content-addressed files (models, flat sources)
  models/<name>             named entries -> blobs (hardlink, symlink or copy)
  sources/<nix32>-<name>    verified unpacked source trees, keyed by NAR hash
  toolchains/<name>-<ver>   unpacked toolchains (cosmocc)
  builds/<key>              build directories, keyed by (source hash, backend, options)
  bin/<engine>-<backend>    installed binaries (`current` links per backend)
  tmp/                      partial downloads and staging (same filesystem: os.replace)
  quarantine/               entries `pylmserv verify` found bad, moved aside (never deleted)
  verified.json             when `pylmserv verify` last ran, and what it found
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
    """The home, created if missing. A populated home on a read-only filesystem is fine:
    nothing is written when nothing is missing."""
    from ..core.errors import UsageError

    root = root or home()
    if os.path.isdir(root):
        pass
    elif os.path.lexists(root):
        raise UsageError(f"PYLMSERV_HOME {root} is not a directory",
                         hint="Point PYLMSERV_HOME at a directory (it is created if missing), or remove that file.")
    else:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"cannot create the pylmserv home {root}: a parent is not a directory",
                             hint="Point PYLMSERV_HOME at a directory path.") from None
    tag = root / "CACHEDIR.TAG"
    if not tag.exists():
        from ..core.fsutil import atomic_write_text

        try:
            atomic_write_text(tag, CACHEDIR_TAG)
        except OSError:
            pass  # only a hint for backup tools; a read-only home still serves reads
    return root


def subdir(name: str, root: Path | None = None) -> Path:
    path = ensure_home(root) / name
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
    return path
