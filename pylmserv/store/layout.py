"""Where pylmserv keeps things. One home ($PYLMSERV_HOME, else the user cache dir).

Layout (this module is the only one that spells these names; everyone else asks it):
  blobs/sha256/<hex>        content-addressed files (models, flat sources)
  models/<name>             named entries -> blobs (hardlink, symlink or copy)
  sources/<nix32>-<name>    verified unpacked source trees, keyed by NAR hash
  toolchains/<name>-<ver>   unpacked toolchains (cosmocc)
  builds/<key>              build directories, keyed by (source hash, backend, options)
  bin/<engine>-<backend>    installed binaries (`current` links per backend)
  tmp/                      partial downloads and staging (same filesystem: os.replace)
  logs/                     server logs
  quarantine/               entries `pylmserv verify` found bad, moved aside (never deleted)
  verified.json             when `pylmserv verify` last ran, and what it found
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional

from ..core.errors import UsageError
from ..core.fsutil import atomic_write_text

if TYPE_CHECKING:  # annotations only: the up-to-date `build` path imports this module, not the hashing types
    from ..core.hashing import Hash

CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by pylmserv.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


def home(environ: Optional[Mapping[str, str]] = None) -> Path:
    """The store's root: $PYLMSERV_HOME (of `environ`, default this process's), else the
    user cache directory."""
    env = (os.environ if environ is None else environ).get("PYLMSERV_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        import platformdirs

        root = Path(platformdirs.user_cache_dir("pylmserv", appauthor=False))
    return root


_HOME_READY: List[Callable[[Path], None]] = []  # store/roots: gc roots wait for the store to exist


def on_home_ready(hook: Callable[[Path], None]) -> None:
    _HOME_READY.append(hook)


def ensure_home(root: Optional[Path] = None) -> Path:
    """The home, created if missing. A populated home on a read-only filesystem is fine:
    nothing is written when nothing is missing."""
    root = root or home()
    if not os.path.isdir(root):
        try:  # no look-then-act: another thread or process may be making it right now
            root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            if os.path.lexists(root) and not os.path.isdir(root):
                raise UsageError(f"PYLMSERV_HOME {root} is not a directory",
                                 hint="Point PYLMSERV_HOME at a directory (it is created if missing), "
                                      "or remove that file.") from None
            raise UsageError(f"cannot create the pylmserv home {root}: a parent is not a directory",
                             hint="Point PYLMSERV_HOME at a directory path.") from None
    tag = root / "CACHEDIR.TAG"
    if not tag.exists():
        try:
            atomic_write_text(tag, CACHEDIR_TAG)
        except OSError:
            pass  # only a hint for backup tools; a read-only home still serves reads
    for hook in _HOME_READY:
        hook(root)
    return root


def subdir(name: str, root: Optional[Path] = None) -> Path:
    path = ensure_home(root) / name
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
    return path


def _base(root: Optional[Path]) -> Path:
    """`root` as given (callers that pass one made it already), else the ensured home."""
    return Path(root) if root is not None else ensure_home()


# -- content-addressed files and trees ----------------------------------------------------

def blobs_root(root: Optional[Path] = None) -> Path:
    return _base(root) / "blobs"


def blobs_dir(algo: str = "sha256", root: Optional[Path] = None) -> Path:
    return blobs_root(root) / algo


def blob_path(h: Hash, root: Optional[Path] = None) -> Path:
    """blobs/<algo>/<hex>: where the file with hash `h` lives (present or not)."""
    return blobs_dir(h.algo, root) / h.hex


def sources_dir(root: Optional[Path] = None) -> Path:
    return _base(root) / "sources"


def source_tree_path(h: Hash, name: str, root: Optional[Path] = None) -> Path:
    """sources/<nix32>-<name>: a verified unpacked tree (the name made path-safe)."""
    safe = re.sub(r"[^A-Za-z0-9+._=-]", "_", name).lstrip(".") or "source"  # a name is not a path
    return sources_dir(root) / f"{h.nix32}-{safe}"


def models_dir(root: Optional[Path] = None) -> Path:
    return _base(root) / "models"


def model_dir(name: str, root: Optional[Path] = None) -> Path:
    """models/<name>: a named entry (callers check the name first)."""
    return models_dir(root) / name


# -- toolchains, builds, installed binaries ------------------------------------------------

def toolchains_dir(root: Optional[Path] = None) -> Path:
    return _base(root) / "toolchains"


def builds_dir(root: Optional[Path] = None) -> Path:
    return _base(root) / "builds"


def build_dir(engine: str, backend: str, key: str, root: Optional[Path] = None) -> Path:
    """builds/<engine>-<backend>-<key>: one build tree per (engine, backend, inputs)."""
    return builds_dir(root) / f"{engine}-{backend}-{key}"


def build_dirs(engine: str, backend: str, root: Optional[Path] = None) -> List[Path]:
    """Every existing build tree of `engine` for `backend`."""
    base = builds_dir(root)
    return sorted(base.glob(f"{engine}-{backend}-*")) if base.is_dir() else []


def bin_dir(root: Optional[Path] = None) -> Path:
    """bin/<engine>-<backend>/<key> (and a `current` link per engine and backend)."""
    return _base(root) / "bin"


# -- scratch ---------------------------------------------------------------------------------

def tmp_root(root: Optional[Path] = None) -> Path:
    """tmp/, not created (for readers such as gc)."""
    return _base(root) / "tmp"


def tmp_dir(root: Optional[Path] = None) -> Path:
    """tmp/ (created): partials and staging on the blobs' filesystem."""
    return subdir("tmp", root)


def logs_dir(root: Optional[Path] = None) -> Path:
    return subdir("logs", root)
