"""Make a locked source present and verified in the store; return its path.

  mode flat  -> blobs/sha256/<hex>                 (the file itself, e.g. cosmocc zip)
  mode nar   -> sources/<nix32>-<name>             (the unpacked tree or git checkout)

A tree is fetched (archive download, or git clone at the locked rev), unpacked with
Nix's semantics, NAR-hashed and compared with the lock before an atomic rename into
place, so the store only ever holds verified content. Present entries are returned
without touching the network. A file lock per entry makes concurrent calls safe.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Tuple

from ..pins.resolvers import git as gitutil
from ..core.archive import extract
from ..pins.lock import LockEntry, git_url_of, is_git
from ..core.errors import PylmservError, UsageError, VerificationError
from ..core.hashing import Hash
from ..core.nar import nar_hash
from .layout import ensure_home, subdir

log = logging.getLogger("pylmserv.sources")

GITHUB = "https://github.com"
LOCK_TIMEOUT = 3600  # seconds to wait for another process fetching the same entry


def github_base() -> str:
    """https://github.com, or PYLMSERV_GITHUB_URL (a mirror; tests use a loopback server)."""
    return (os.environ.get("PYLMSERV_GITHUB_URL") or GITHUB).rstrip("/")


def mirror_url(url: str) -> str:
    """Rewrite a github.com URL onto PYLMSERV_GITHUB_URL when that is set."""
    base = github_base()
    if base != GITHUB and url.startswith(GITHUB + "/"):
        return base + url[len(GITHUB):]
    return url


def store_path(entry: LockEntry, root: Optional[Path] = None) -> Path:
    """Where `entry` lives once verified (whether or not it is there yet)."""
    home = root or ensure_home()
    if entry.mode == "flat":
        return home / "blobs" / entry.hash.algo / entry.hash.hex
    safe = re.sub(r"[^A-Za-z0-9+._=-]", "_", entry.name).lstrip(".") or "source"  # a name is not a path
    return home / "sources" / f"{entry.hash.nix32}-{safe}"


def is_git_entry(entry: LockEntry) -> bool:
    return is_git(entry)


def ensure_source(entry: LockEntry, root: Optional[Path] = None) -> Path:
    """Return the store path of `entry`, fetching and verifying it first if needed."""
    from filelock import FileLock, Timeout

    root = Path(root) if root else ensure_home()
    target = store_path(entry, root)
    if os.path.lexists(target):
        return target
    tmp = subdir("tmp", root)
    lock = FileLock(str(tmp / f"{target.name}.lock"))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT)
    except Timeout:
        raise PylmservError(f"{entry.name}: another pylmserv process has been fetching it for {LOCK_TIMEOUT}s",
                            hint=f"Wait for it, or stop it and delete {lock.lock_file}.") from None
    try:
        if os.path.lexists(target):  # another process finished it while we waited
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{target.name[-60:]}.", dir=tmp) as work:
            staged = fetch_entry(entry, Path(work))
            got = nar_hash(staged, entry.hash.algo) if entry.mode == "nar" else _flat(staged, entry.hash.algo)
            check_hash(entry, got)
            if entry.mode == "flat":
                os.chmod(staged, 0o444)
            os.replace(staged, target)
    finally:
        lock.release()
    log.info("%s: verified %s", entry.name, entry.hash.sri)
    return target


def check_hash(entry: LockEntry, got: Hash) -> None:
    if got != entry.hash:
        raise VerificationError(
            f"{entry.kind}.{entry.name}: hash mismatch for {entry.url}: expected {entry.hash.sri}, got {got.sri}",
            hint=f"If the upstream changed on purpose, run `pylmserv prefetch --refresh {entry.name}`; "
                 "otherwise the download is corrupt or was tampered with.")


def fetch_entry(entry: LockEntry, work: Path) -> Path:
    """Fetch `entry` into `work` (unverified); returns the file or tree to hash."""
    if is_git_entry(entry):
        if not entry.rev:
            raise UsageError(f"{entry.kind}.{entry.name}: git source without rev in the lock",
                             hint=f"Run `pylmserv prefetch --refresh {entry.name}`.")
        return gitutil.checkout(mirror_url(git_url_of(entry)), entry.rev, work / "checkout",
                                submodules=entry.submodules)
    archive = work / "download"
    download(mirror_url(entry.url), archive)  # partials in the store's tmp/: resumable across runs
    if entry.mode == "flat":
        return archive
    return extract(archive, work / "tree", policy="tar", strip_single_root=True)


def _flat(path: Path, algo: str) -> Hash:
    from ..core.hashing import file_hash
    return file_hash(path, algo)


# -- downloading ---------------------------------------------------------------------

def download(url: str, out: Path, headers: Optional[dict] = None, tmp_dir: Optional[Path] = None) -> Tuple[Hash, int]:
    """Fetch `url` (https, http, file://) to `out` with pylmserv.download's engine
    (ranged, resumable, retried); returns (sha256, size). Verification against the lock
    happens in the caller, on the file or on the unpacked tree."""
    from ..transfer.download import download as engine

    result = engine(url, out, headers=headers, tmp_dir=tmp_dir)
    return result.sha256, result.size
