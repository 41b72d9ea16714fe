"""Make a locked source present and verified in the store; return its path.

  mode flat  -> blobs/sha256/<hex>                 (the file itself, e.g. cosmocc zip)
  mode nar   -> sources/<nix32>-<name>             (the unpacked tree or git checkout)

A tree is fetched (archive download, or git clone at the locked rev), unpacked with
Nix's semantics, NAR-hashed and compared with the lock before an atomic rename into
place, so the store only ever holds verified content. Present entries are returned
without touching the network. A file lock per entry makes concurrent calls safe.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

from ..core.archive import extract
from ..core.errors import PylmservError, UsageError, VerificationError
from ..core.flock import FileLock, LockTimeout
from ..core.fsutil import temp_dir
from ..core.hashing import Hash, file_hash
from ..core.log import get_logger
from ..core.nar import nar_hash
from ..transfer import git as gitutil
from ..transfer.download import download as engine
from ..transfer.http import refuse_credentials
from . import layout
from .blobs import install_blob
from .layout import ensure_home

try:  # the store states what it needs of a pin; pins' SourcePin has it
    from typing import Protocol
except ImportError:  # pragma: no cover - Python 3.7
    Protocol = object  # type: ignore[assignment,misc]


class SourcePin(Protocol):
    """A locked source as the store sees it (pins/config.SourcePin fits)."""

    kind: str
    name: str
    url: str
    hash: Hash
    mode: str  # flat | nar
    rev: Optional[str]

    def get(self, key: str, default=None): ...

log = get_logger("pylmserv.sources")

GITHUB = "https://github.com"
LOCK_TIMEOUT = 3600  # seconds to wait for another process fetching the same entry


def github_base() -> str:
    """https://github.com, or PYLMSERV_GITHUB_URL (a mirror; tests use a loopback server)."""
    return refuse_credentials((os.environ.get("PYLMSERV_GITHUB_URL") or GITHUB).rstrip("/"), "PYLMSERV_GITHUB_URL")


def mirror_url(url: str) -> str:
    """Rewrite a github.com URL onto PYLMSERV_GITHUB_URL when that is set."""
    base = github_base()
    if base != GITHUB and url.startswith(GITHUB + "/"):
        return base + url[len(GITHUB):]
    return url


def store_path(entry: SourcePin, root: Optional[Path] = None) -> Path:
    """Where `entry` lives once verified (whether or not it is there yet)."""
    if entry.mode == "flat":
        return layout.blob_path(entry.hash, root)
    return layout.source_tree_path(entry.hash, entry.name, root)


def is_git_entry(entry: SourcePin) -> bool:
    kind = entry.get("type")
    return kind == "git" or (kind == "github" and bool(entry.get("submodules")))


def ensure_source(entry: SourcePin, root: Optional[Path] = None) -> Path:
    """Return the store path of `entry`, fetching and verifying it first if needed."""
    root = Path(root) if root else ensure_home()
    target = store_path(entry, root)
    if os.path.lexists(target):
        return target
    tmp = layout.tmp_dir(root)
    lock = FileLock(tmp / f"{target.name}.lock")
    try:
        lock.acquire(timeout=LOCK_TIMEOUT)
    except LockTimeout:
        raise PylmservError(f"{entry.name}: another pylmserv process has been fetching it for {LOCK_TIMEOUT}s",
                            hint=f"Wait for it, or stop it and delete {lock.lock_file}.") from None
    try:
        if os.path.lexists(target):  # another process finished it while we waited
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with temp_dir(prefix=f"tree.{os.getpid()}.{target.name[-60:]}.", dir=tmp) as work:
            staged = fetch_entry(entry, work)
            got = nar_hash(staged, entry.hash.algo) if entry.mode == "nar" else _flat(staged, entry.hash.algo)
            check_hash(entry, got)
            if entry.mode == "flat":
                install_blob(staged, entry.hash, root)  # the one blob installer: fsync, read-only
            else:
                os.replace(staged, target)
    finally:
        lock.release()
    log.info("%s: verified %s", entry.name, entry.hash.sri)
    return target


def check_hash(entry: SourcePin, got: Hash) -> None:
    if got != entry.hash:
        raise VerificationError(
            f"{entry.kind}.{entry.name}: hash mismatch for {entry.url}: expected {entry.hash.sri}, got {got.sri}",
            hint=f"If the upstream changed on purpose, run `pylmserv prefetch --refresh {entry.name}`; "
                 "otherwise the download is corrupt or was tampered with.")


def fetch_entry(entry: SourcePin, work: Path) -> Path:
    """Fetch `entry` into `work` (unverified); returns the file or tree to hash."""
    if is_git_entry(entry):
        if not entry.rev:
            raise UsageError(f"{entry.kind}.{entry.name}: git source without rev in the lock",
                             hint=f"Run `pylmserv prefetch --refresh {entry.name}`.")
        return gitutil.checkout(mirror_url(entry.get("git_url") or entry.url), entry.rev, work / "checkout",
                                submodules=bool(entry.get("submodules")))
    archive = work / "download"
    download(mirror_url(entry.url), archive, tmp_dir=layout.tmp_dir())  # resumable across runs
    if entry.mode == "flat":
        return archive
    return extract(archive, work / "tree", policy="tar", strip_single_root=True)


def _flat(path: Path, algo: str) -> Hash:
    return file_hash(path, algo)


# -- downloading ---------------------------------------------------------------------

def download(url: str, out: Path, headers: Optional[dict] = None, tmp_dir: Optional[Path] = None) -> Tuple[Hash, int]:
    """Fetch `url` (https, http, file://) to `out` with pylmserv.download's engine
    (ranged, resumable, retried); returns (sha256, size). Verification against the lock
    happens in the caller, on the file or on the unpacked tree."""
    result = engine(url, out, headers=headers, tmp_dir=tmp_dir)
    return result.sha256, result.size
