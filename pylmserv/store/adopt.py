"""Adopt: take a file another tool already downloaded instead of downloading it again.

The lock names every model file by its sha256, so where the bytes come from does not matter,
only that they are checked. This module looks in the places other tools keep models:

  hf         Hugging Face cache: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub
             models--ORG--REPO/blobs/<sha256>   (an LFS file's blob is named by its sha256)
  ollama     $OLLAMA_MODELS, ~/.ollama/models:  blobs/sha256-<hex>
  lmstudio   ~/.lmstudio/models, ~/.cache/lm-studio/models: PUBLISHER/REPO/FILE
  llama.cpp  $LLAMA_CACHE, ~/.cache/llama.cpp: the old flat naming OWNER_REPO_FILE ('/' in
             FILE made '_'), and the Hugging Face layout (llama.cpp common/hf-cache.cpp @
             6fd16ba05c88846ba5e6d8fd053c6230509d5ffc: make_old_cache_filename; newer llama.cpp
             writes models--ORG--REPO/blobs/<sha256> into the HF cache itself, scanned as hf)
  user       directories the user lists (adopt-from in pylmserv.toml, $PYLMSERV_ADOPT_FROM):
             a file with the wanted name, or named by the hash (<hex>, sha256-<hex>), up to
             a few levels deep

A candidate is checked by size first (a stat), then hashed once. One that verifies is put
into the store by a hard link (same filesystem: no byte copied), else a reflink (FICLONE:
shared extents), else a copy, and the caller is told which. The other tool's files are only
ever opened read-only: never written, chmod-ed, moved or deleted (a hard link shares the
inode, so even its mode stays the other tool's). A candidate that is a symlink leaving its
tool's folder, changes while it is read, cannot be read, or has other bytes is skipped,
with the reason.
"""
from __future__ import annotations

import contextvars
import errno
import hashlib
from ..core.log import get_logger
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from ..core.fsutil import fsync_dir, unlink_missing_ok
from ..core.hashing import Hash
from ..core.record import Factory, Record, hash_by_value
from . import blobs as store

log = get_logger("pylmserv.adopt")

TOOLS = ("hf", "ollama", "lmstudio", "llama.cpp", "user")
ADOPT_FROM_ENV = "PYLMSERV_ADOPT_FROM"
NO_ADOPT_ENV = "PYLMSERV_NO_ADOPT"
USER_DEPTH = 4  # how deep a user directory is searched for a file by name
FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
CHUNK = 1 << 20


# Records, not dataclasses: `fetch` imports this module (~4 M instructions a
# dataclass).
class Place(Record):
    __slots__ = ("tool", "root")
    tool: str  # one of TOOLS
    root: Path

    __hash__ = hash_by_value


class Want(Record):
    """A locked file: its hash, size (None: unknown), file name and Hub repo if it has one."""

    __slots__ = ("hash", "size", "filename", "repo")
    _defaults = {"repo": None}
    hash: Hash
    size: Optional[int]
    filename: str
    repo: Optional[str]  # org/repo on the Hub, when the URL or pin says so

    __hash__ = hash_by_value


class Skipped(Record):
    __slots__ = ("path", "tool", "reason")
    path: Path
    tool: str
    reason: str

    __hash__ = hash_by_value

    def to_json(self) -> dict:
        return {"path": str(self.path), "tool": self.tool, "reason": self.reason}


class Found(Record):
    """A verified copy: where it is, and (once adopted) how it entered the store."""

    __slots__ = ("path", "tool", "size", "method", "bytes_copied")
    _defaults = {"method": None, "bytes_copied": 0}
    path: Path
    tool: str
    size: int
    method: Optional[str]  # hardlink | reflink | copy; None: verified only (dry run)
    bytes_copied: int

    __hash__ = hash_by_value

    def to_json(self) -> dict:
        return {"path": str(self.path), "tool": self.tool, "size": self.size, "method": self.method,
                "bytes_copied": self.bytes_copied}


class Outcome(Record):
    """What `find` saw: the copy it took (or None) and every candidate it skipped, with why
    (a list `find` appends to)."""

    __slots__ = ("found", "skipped")
    _defaults = {"found": None, "skipped": Factory(list)}
    found: Optional[Found]
    skipped: List[Skipped]


# -- where to look ------------------------------------------------------------------------------

def _home_dir(env) -> Path:
    return Path(env.get("HOME") or os.path.expanduser("~"))


def _cache_dir(env) -> Path:
    xdg = env.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg else _home_dir(env) / ".cache"


def hf_cache_dir(env=None) -> Path:
    """The Hugging Face hub cache as huggingface_hub computes it (constants.py)."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    hf_home = Path(env["HF_HOME"]).expanduser() if env.get("HF_HOME") else _cache_dir(env) / "huggingface"
    return hf_home / "hub"


def ollama_dir(env=None) -> Path:
    env = os.environ if env is None else env
    return Path(env["OLLAMA_MODELS"]).expanduser() if env.get("OLLAMA_MODELS") else _home_dir(env) / ".ollama" / "models"


def lmstudio_dirs(env=None) -> List[Path]:
    env = os.environ if env is None else env
    return [_home_dir(env) / ".lmstudio" / "models", _home_dir(env) / ".cache" / "lm-studio" / "models"]


def llama_cache_dir(env=None) -> Path:
    env = os.environ if env is None else env
    return Path(env["LLAMA_CACHE"]).expanduser() if env.get("LLAMA_CACHE") else _cache_dir(env) / "llama.cpp"


def default_places(extra: Sequence[Path] = (), env=None) -> List[Place]:
    """Every place to look, in order: the tools' default locations (as their environment
    variables set them), then `extra` and $PYLMSERV_ADOPT_FROM (os.pathsep-separated)."""
    env = os.environ if env is None else env
    places = [Place("hf", hf_cache_dir(env)), Place("ollama", ollama_dir(env))]
    places += [Place("lmstudio", d) for d in lmstudio_dirs(env)]
    places.append(Place("llama.cpp", llama_cache_dir(env)))
    users = list(extra) + [Path(p).expanduser() for p in env.get(ADOPT_FROM_ENV, "").split(os.pathsep) if p]
    places += [Place("user", Path(p)) for p in users]
    out, seen = [], set()
    for p in places:
        key = (p.tool, str(p.root))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def disabled(env=None) -> bool:
    env = os.environ if env is None else env
    return env.get(NO_ADOPT_ENV, "").lower() in ("1", "true", "yes")


# -- candidates ----------------------------------------------------------------------------------

def _hf_dirs(root: Path, repo: Optional[str]) -> List[Path]:
    """models--ORG--REPO folders: the repo's own first, then every other (a blob is named by
    its sha256, so the same file in another repo is the same file)."""
    out = []
    if repo:
        out.append(root / ("models--" + repo.replace("/", "--")))
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith("models--"))
    except OSError:
        return out
    out += [root / n for n in names if root / n not in out]
    return out


def candidates(want: Want, place: Place, problems: Optional[List[Tuple[Path, str]]] = None) -> Iterator[Path]:
    """Paths in `place` that may hold `want` (unchecked: existence, size and bytes are the
    caller's to check). Folders that cannot be read are added to `problems`."""
    root, hexd = place.root, want.hash.hex
    if place.tool in ("hf", "llama.cpp"):
        for d in _hf_dirs(root, want.repo):
            yield d / "blobs" / hexd
    if place.tool == "ollama":
        yield root / "blobs" / f"sha256-{hexd}"
    if place.tool == "llama.cpp":
        if want.repo:  # the old flat naming: OWNER_REPO_FILE (hf-cache.cpp make_old_cache_filename)
            yield root / (want.repo.replace("/", "_") + "_" + want.filename)
        yield from _listed(root, lambda n: n == want.filename or n.endswith("_" + want.filename))
    if place.tool == "lmstudio":
        if want.repo:
            yield root / want.repo / want.filename
        yield from _walk(root, {want.filename}, depth=3, problems=problems)
    if place.tool == "user":
        yield from _walk(root, {want.filename, hexd, f"sha256-{hexd}"}, depth=USER_DEPTH, problems=problems)


def _listed(root: Path, match) -> Iterator[Path]:
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return
    for n in names:
        if match(n):
            yield root / n


def _walk(root: Path, names: set, depth: int, problems: Optional[List[Tuple[Path, str]]] = None) -> Iterator[Path]:
    """Files named one of `names` under `root`, `depth` levels at most; symlinked folders
    are not entered, unreadable ones skipped and added to `problems`."""
    if not os.path.isdir(root):
        return

    def unreadable(exc: OSError) -> None:
        if problems is not None:
            problems.append((Path(exc.filename or root), f"folder cannot be read ({exc.strerror}); not searched"))

    base = len(str(root).rstrip(os.sep).split(os.sep))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable):
        level = len(dirpath.rstrip(os.sep).split(os.sep)) - base
        if level >= depth - 1:
            dirnames[:] = []
        dirnames.sort()
        for n in sorted(filenames):
            if n in names:
                yield Path(dirpath) / n


# -- checking one candidate ----------------------------------------------------------------------

def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _resolve(path: Path, place: Place) -> Tuple[Optional[str], Optional[str]]:
    """(the real path, None), or (None, why it is skipped). A symlink may point within its
    tool's folder (the Hugging Face cache's snapshots do), never out of it."""
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        return None, None  # nothing there: not worth a word
    except OSError as exc:
        return None, f"cannot be resolved ({exc.strerror})"
    root = os.path.realpath(place.root)
    if not _inside(real, root):
        return None, f"a symlink that leaves {place.tool}'s folder (-> {real}); not followed"
    return real, None


def check(path: Path, want: Want, place: Place, home: Path, adopt: bool = True) -> Tuple[Optional[Found], Optional[str]]:
    """(Found, None) when `path` holds exactly `want` (and, with adopt, it is now in the
    store), else (None, why not) - why is None when there was simply nothing there."""
    real, why = _resolve(path, place)
    if real is None:
        return None, why
    try:
        st = os.stat(real)
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return None, None if stat.S_ISDIR(st.st_mode) else "not a regular file"
    if want.size is not None and st.st_size != want.size:
        return None, f"{st.st_size} bytes, the lock says {want.size}"
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return None, f"cannot be opened ({exc.strerror})"
    try:
        return _verify_and_take(fd, real, want, place, home, adopt)
    finally:
        os.close(fd)


def _ident(st: os.stat_result) -> tuple:
    # Not ctime: our own hard link changes it (the link count is inode metadata).
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _hash_fd(fd: int, out: Optional[int] = None) -> Tuple[Hash, int]:
    """sha256 of an open file from its start (and, with `out`, its bytes written there too)."""
    h = hashlib.sha256()
    n = 0
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
        if out is not None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
    return Hash.from_hashlib(h), n


def _verify_and_take(fd: int, real: str, want: Want, place: Place, home: Path,
                     adopt: bool) -> Tuple[Optional[Found], Optional[str]]:
    before = os.fstat(fd)
    if not adopt:  # dry run: verify only
        got, n = _hash_fd(fd)
        if _ident(os.fstat(fd)) != _ident(before):
            return None, "changed while it was read (still being written?)"
        if got != want.hash:
            return None, f"other bytes (sha256 {got.hex[:16]}...)"
        return Found(Path(real), place.tool, n), None
    tmp = store.temp_path(f"adopt-{want.hash.hex[:16]}", home)
    method, copied = None, 0
    try:
        # 1. a hard link: the same inode, no byte copied; its bytes are hashed once, in place.
        try:
            os.link(real, tmp, follow_symlinks=False)
            if _ident(os.stat(tmp))[:2] != _ident(before)[:2]:  # the path was swapped under us
                unlink_missing_ok(tmp)
            else:
                method = "hardlink"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP,
                                 errno.EOPNOTSUPP):
                raise
        if method == "hardlink":
            got, n = _hash_fd(fd)
        else:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                # 2. a reflink: shared extents, our own snapshot; hash the snapshot.
                try:
                    import fcntl

                    fcntl.ioctl(out, FICLONE, fd)
                    method = "reflink"
                except (OSError, ImportError):
                    method = "copy"
                if method == "reflink":
                    got, n = _hash_path(tmp)
                else:  # 3. a copy, hashed as it is written: the store gets exactly the bytes hashed
                    os.ftruncate(out, 0)
                    got, n = _hash_fd(fd, out)
                    copied = n
                os.fsync(out)
            finally:
                os.close(out)
            os.chmod(tmp, 0o444)
        if _ident(os.fstat(fd)) != _ident(before):
            return None, "changed while it was read (still being written?)"
        if got != want.hash or (want.size is not None and n != want.size):
            return None, f"other bytes (sha256 {got.hex[:16]}...)"
        target = store.blob_path(want.hash, home)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not store.has_blob(want.hash, home, n):
            os.replace(tmp, target)
            fsync_dir(target.parent)
        return Found(Path(real), place.tool, n, method, copied), None
    finally:
        unlink_missing_ok(tmp)


def _hash_path(path) -> Tuple[Hash, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


# -- the search ------------------------------------------------------------------------------------

def find(want: Want, places: Iterable[Place], home: Path, adopt: bool = True) -> Outcome:
    """Look for `want` in `places`, first verified copy wins (adopted into the store unless
    adopt=False). Every candidate that was there but not taken is in .skipped with why."""
    outcome = Outcome()
    seen = set()
    for place in places:
        problems: List[Tuple[Path, str]] = []
        for path in candidates(want, place, problems):
            key = str(path)
            if key in seen:
                continue
            seen.add(key)
            try:
                found, why = check(path, want, place, home, adopt=adopt)
            except OSError as exc:
                found, why = None, f"cannot be read ({exc.strerror})"
            if found is not None:
                return Outcome(found, outcome.skipped + [Skipped(p, place.tool, w) for p, w in problems])
            if why:
                outcome.skipped.append(Skipped(path, place.tool, why))
        outcome.skipped.extend(Skipped(p, place.tool, why) for p, why in problems)
    return outcome


def adopt_blob(want: Want, places: Iterable[Place], home: Path) -> Outcome:
    """Under the blob's lock: the store's own copy, else the first verified copy elsewhere
    linked in. Logs what it took and what it skipped."""
    with store.blob_lock(want.hash, home):
        if store.has_blob(want.hash, home, want.size):
            size = store.blob_path(want.hash, home).stat().st_size
            return Outcome(Found(store.blob_path(want.hash, home), "store", size, "present"))
        outcome = find(want, places, home)
    for s in outcome.skipped:
        log.warning("%s: not adopting %s (%s): %s", want.filename, s.path, s.tool, s.reason)
    f = outcome.found
    if f is not None:
        log.info("%s: adopted from %s %s by %s (%d bytes copied)", want.filename, f.tool, f.path, f.method,
                 f.bytes_copied)
    return outcome


def repo_of_url(url: str) -> Optional[str]:
    """org/repo of a Hub URL (https://HOST/ORG/REPO/resolve/REV/FILE), else None."""
    from urllib.parse import urlsplit

    parts = urlsplit(url).path.strip("/").split("/")
    if len(parts) >= 5 and parts[2] == "resolve":
        return "/".join(parts[:2])
    return None


# -- the hook `fetch` calls before it downloads ------------------------------------------------

_PLACES: contextvars.ContextVar[Optional[List[Place]]] = contextvars.ContextVar("pylmserv_adopt_places",
                                                                              default=None)


def configure(places: Optional[List[Place]]) -> None:
    """The places this fetch looks in ([] turns adoption off; None: default_places())."""
    _PLACES.set(places)


def before_download(h: Optional[Hash], size: Optional[int], filename: str, url: str,
                    home: Path) -> Optional[Tuple[Hash, int, int]]:
    """What `fetch` asks before downloading a file: (hash, size, 0 bytes downloaded) when a
    verified copy from another tool is now in the store, else None (download it)."""
    places = _PLACES.get()
    if h is None or disabled() or places == []:
        return None
    places = default_places() if places is None else places
    outcome = adopt_blob(Want(h, size, filename, repo_of_url(url) if url else None), places, home)
    if outcome.found is None:
        return None
    return h, outcome.found.size, 0
