"""The content-addressed store: verified blobs by sha256, named entries pointing at them.

  blobs/sha256/<hex>              the bytes, read-only, stored once whatever their names
  models/<name>/<filename>        a named entry: hardlink to the blob (else symlink, else
                                  copy) under the file's own name, so tools that look at
                                  names (llama.cpp split sets) see the original file names
  models/<name>/.pylmserv.json    which blob each file is (name -> sha256, size)
  tmp/<hex>.lock                  the per-blob lock (shared with pylmserv.sources)

Blobs only ever appear by os.replace of a file already verified against its hash, so a
path under blobs/ is trusted without re-hashing. The home carries CACHEDIR.TAG
(paths.ensure_home) so backup tools skip it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from ..core.errors import UsageError
from ..core.hashing import Hash
from ..core.flock import FileLock, LockTimeout
from ..core.fsutil import atomic_write_text, fsync_dir, read_state_text, unlink_missing_ok
from ..core.log import get_logger
from ..core.record import Record, hash_by_value
from . import layout
from .layout import ensure_home

log = get_logger("pylmserv.store")

MANIFEST = ".pylmserv.json"
LINK_MODES = ("auto", "hardlink", "symlink", "copy")
LINK_MODE_ENV = "PYLMSERV_LINK_MODE"


# Records, not dataclasses: `fetch` imports this module (~4 M instructions a dataclass).
class StoredFile(Record):
    __slots__ = ("path", "sha256", "size")
    path: Path  # the named file (models/<name>/<filename>)
    sha256: Optional[Hash]  # None for files unpacked from an archive (the archive is pinned)
    size: int

    __hash__ = hash_by_value


class NamedEntry(Record):
    __slots__ = ("name", "files", "directory")
    name: str
    files: Tuple[StoredFile, ...]
    directory: Path

    __hash__ = hash_by_value

    @property
    def path(self) -> Path:
        """The file to hand to llama.cpp: the only file, or the first shard of a split set."""
        return self.files[0].path

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def root(home: Optional[Path] = None) -> Path:
    return ensure_home(home)


# -- blobs -----------------------------------------------------------------------------

def blob_path(h: Hash, home: Optional[Path] = None) -> Path:
    """Where the blob with hash `h` lives (present or not)."""
    return layout.blob_path(h, home)


def has_blob(h: Hash, home: Optional[Path] = None, size: Optional[int] = None) -> bool:
    path = blob_path(h, home)
    try:
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)


def tmp_dir(home: Optional[Path] = None) -> Path:
    return layout.tmp_dir(home)


def temp_path(hint: str, home: Optional[Path] = None) -> Path:
    """A unique staging path in tmp/ (same filesystem as blobs/, so installs are renames)."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in hint)[:80]
    return tmp_dir(home) / f"{safe}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


@contextlib.contextmanager
def blob_lock(h: Hash, home: Optional[Path] = None) -> Iterator[None]:
    """Exclusive per-blob lock across processes. It is an flock: a killed holder
    releases it with its death, so stale locks recover by themselves."""
    lock = FileLock(tmp_dir(home) / f"{h.hex}.lock")
    try:
        lock.acquire(timeout=0.2)
    except LockTimeout:
        log.info("waiting for another pylmserv process fetching sha256 %s...", h.hex[:12])
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def install_blob(verified_file: Path, h: Hash, home: Optional[Path] = None) -> Path:
    """Move a file already verified to hash `h` into blobs/ (atomic; read-only).

    If the blob is already there, the new copy is dropped: same hash, same bytes."""
    target = blob_path(h, home)
    target.parent.mkdir(parents=True, exist_ok=True)
    if has_blob(h, home, size=os.path.getsize(verified_file)):
        unlink_missing_ok(verified_file)
        return target
    os.chmod(verified_file, 0o444)
    with open(verified_file, "rb") as f:
        os.fsync(f.fileno())
    os.replace(verified_file, target)
    fsync_dir(target.parent)
    return target


_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def blobs(home: Optional[Path] = None) -> List[Tuple[Hash, Path, int]]:
    base = layout.blobs_dir("sha256", home)
    out = []
    if base.is_dir():
        for p in sorted(base.iterdir()):
            if _HEX64.match(p.name) and p.is_file():  # anything else is not a blob (verify names it)
                out.append((Hash("sha256", bytes.fromhex(p.name)), p, p.stat().st_size))
    return out


def store_size(home: Optional[Path] = None) -> int:
    """Bytes held by blobs (named entries are links to them)."""
    return sum(size for _, _, size in blobs(home))


# -- named entries ---------------------------------------------------------------------

def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise UsageError(f"invalid model name {name!r}", hint="Use letters, digits, '-', '_' and '.'.")


def entry_dir(name: str, home: Optional[Path] = None) -> Path:
    _check_name(name)
    return layout.model_dir(name, home)


def link_named(name: str, h: Hash, filename: Optional[str] = None, home: Optional[Path] = None,
               mode: Optional[str] = None) -> Path:
    """Make models/<name>/<filename> point at blob `h`; returns that path.

    Adds to the entry (split sets link several files under one name)."""
    blob = blob_path(h, home)
    if not blob.is_file():
        raise UsageError(f"blob sha256 {h.hex} is not in the store")
    filename = filename or name
    _check_name(filename)
    directory = entry_dir(name, home)
    if os.path.islink(directory):  # a link planted where an entry belongs: removed, never written through
        os.unlink(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / filename
    if _same_inode(target, blob):
        _record(directory, filename, h, blob.stat().st_size)
        return target
    place(blob, target, mode=mode)
    _record(directory, filename, h, blob.stat().st_size)
    return target


def place(blob: Path, target: Path, mode: Optional[str] = None) -> str:
    """Put `blob` at `target` atomically by hardlink, else symlink, else copy.

    Returns the method used. `mode` (or $PYLMSERV_LINK_MODE) forces one."""
    mode = mode or os.environ.get(LINK_MODE_ENV) or "auto"
    if mode not in LINK_MODES:
        raise UsageError(f"unknown link mode {mode!r}", hint="Use one of: " + ", ".join(LINK_MODES))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    order = ["hardlink", "symlink", "copy"] if mode == "auto" else [mode]
    last: Optional[OSError] = None
    for method in order:
        try:
            if method == "hardlink":
                os.link(blob, tmp)
            elif method == "symlink":
                os.symlink(os.path.abspath(blob), tmp)
            else:
                import shutil  # lazy for speed: only the copy link mode copies (fetch from the store: no shutil)

                shutil.copyfile(blob, tmp)
            os.replace(tmp, target)
            return method
        except OSError as exc:
            unlink_missing_ok(tmp)
            last = exc
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES, errno.EOPNOTSUPP):
                raise
    assert last is not None
    raise last


def _same_inode(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _record(directory: Path, filename: str, h: Hash, size: int) -> None:
    manifest = _read_manifest(directory)
    if manifest.get(filename) == {"sha256": h.hex, "size": size}:
        return  # already recorded: a read-only store stays unwritten
    manifest[filename] = {"sha256": h.hex, "size": size}
    atomic_write_text(directory / MANIFEST, json.dumps({"files": manifest}, indent=1, sort_keys=True) + "\n")


def set_order(name: str, filenames: Sequence[str], home: Optional[Path] = None) -> None:
    """Record the file order of an entry (split sets: shard 1 first)."""
    directory = entry_dir(name, home)
    manifest = _read_manifest(directory)
    data = {"files": manifest, "order": list(filenames)}
    try:
        if json.loads(read_state_text(directory / MANIFEST)) == data:
            return  # unchanged: nothing to write
    except (OSError, ValueError):
        pass
    atomic_write_text(directory / MANIFEST, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _read_manifest(directory: Path) -> dict:
    try:
        data = json.loads(read_state_text(directory / MANIFEST))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return dict(files) if isinstance(files, dict) else {}


def inside_name(rel) -> bool:
    """A manifest's file name that stays inside its entry: relative, no `..`, no NUL."""
    if not isinstance(rel, str) or not rel or "\0" in rel or rel.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def lookup(name: str, home: Optional[Path] = None) -> Optional[NamedEntry]:
    """The named entry `name` if it is in the store and its files are intact, else None."""
    directory = entry_dir(name, home)
    try:
        raw = json.loads(read_state_text(directory / MANIFEST))
    except (OSError, ValueError):
        return None
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not all(inside_name(n) for n in files):
        return None  # an edited manifest: no path outside the entry is ever taken for the model
    order = raw.get("order")
    order = [n for n in order if isinstance(n, str) and n in files] if isinstance(order, list) else []
    out = []
    for filename in order or sorted(files):
        meta = files[filename]
        try:
            h = Hash("sha256", bytes.fromhex(meta["sha256"])) if meta.get("sha256") else None
            size = int(meta["size"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        path = directory / filename
        if not path.is_file() or path.stat().st_size != size:
            return None
        out.append(StoredFile(path, h, size))
    if not out:
        return None
    return NamedEntry(name, tuple(out), directory)


def write_tree_manifest(directory: Path, archive: Hash, files: Sequence[Tuple[str, int]]) -> None:
    """Manifest of an entry unpacked from a verified archive: file sizes, archive hash."""
    data = {"archive": {"sha256": archive.hex}, "files": {rel: {"size": size} for rel, size in files},
            "order": [rel for rel, _ in files]}
    atomic_write_text(directory / MANIFEST, json.dumps(data, indent=1, sort_keys=True) + "\n")
