"""The store's sweep: everything not kept is garbage; nothing in use is touched.

What is kept comes from the caller (the paths its roots reference, the sources whose
builds may stay); this module knows the store's kinds of things and their locks:

  blobs/sha256/<hex>      tmp/<hex>.lock            models/<name>   (no lock: by root name)
  sources/<nar>-<name>    tmp/<dir>.lock            toolchains/<d>  tmp/<d>.lock
  builds/<engine>-<backend>-<key>   builds/<dir>.lock (held while a build runs)
  bin/<engine>-<backend>/<key>      installed copies; `current` names the one in use
  tmp/dl-<key>.part|.state.json     tmp/dl-<key>.lock (held while a download runs)

An item is deleted only while this process holds its lock (taken without waiting: a lock
held elsewhere means in use, and the item is reported as such). A tree is first renamed
into tmp/ and removed from there, so a half-deleted tree never sits at its store path.
Other staging files in tmp/ are removed only when no pylmserv lock in tmp/ is held.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ..core.flock import FileLock, LockTimeout
from ..core.fsutil import read_state_text, remove_no_follow, tree_size, tree_stats
from . import layout, records

KINDS = ("blob", "source", "toolchain", "model", "build", "install", "partial", "staging")


@dataclass(frozen=True)
class Item:
    kind: str
    path: Path
    size: int  # bytes of its files (apparent)
    reason: str = ""

    def to_json(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "size": self.size, "reason": self.reason}


@dataclass
class Report:
    home: Path
    dry_run: bool
    garbage: List[Item] = field(default_factory=list)  # deleted (or, dry run, would be)
    in_use: List[Item] = field(default_factory=list)  # garbage by the roots, but locked by a live process
    kept: int = 0
    freed: int = 0  # bytes whose last link went (hardlinks counted once)
    store_size: int = 0

    def to_json(self) -> dict:
        return {"home": str(self.home), "dry_run": self.dry_run, "freed": self.freed, "store_size": self.store_size,
                "kept": self.kept, "deleted" if not self.dry_run else "would_delete": [i.to_json() for i in self.garbage],
                "in_use": [i.to_json() for i in self.in_use]}


@dataclass(frozen=True)
class Keep:
    """What the roots reference: store paths, named model entries, sources whose builds may stay."""

    paths: Set[Path] = field(default_factory=set)
    models: Dict[str, Set[str]] = field(default_factory=dict)  # entry name -> sha256 hexes it may hold
    build_sources: Set[str] = field(default_factory=set)  # SRI hashes of rooted sources
    keep_builds: int = 1


# -- sizes ------------------------------------------------------------------------------------

def freed_bytes(paths: Iterable[Path]) -> int:
    """Bytes freed by deleting all `paths`: an inode counts when all its links are among them."""
    seen: Dict[Tuple[int, int], List] = {}
    for p in paths:
        for st in tree_stats(p):
            rec = seen.setdefault((st.st_dev, st.st_ino), [st.st_size, st.st_nlink, 0])
            rec[2] += 1
    return sum(size for size, nlink, count in seen.values() if count >= nlink)


# -- locks -------------------------------------------------------------------------------------

def _remove(path: Path, home: Path) -> None:
    """Rename into tmp/ first (atomic: the store path is gone at once), then delete without
    following any link (core.fsutil.remove_no_follow: a link goes as a link). A store
    directory that is a link to another filesystem (blobs/ on another disk) cannot be
    renamed into tmp/: the item is renamed beside itself instead, then deleted."""
    name = f"gc-trash.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    trash = layout.tmp_root(home) / name
    try:
        if not os.path.isdir(trash.parent):
            trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, trash)
    except FileNotFoundError:
        if not os.path.lexists(path):
            return
        raise
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        trash = path.parent / f".{name}"
        os.replace(path, trash)
    remove_no_follow(trash)


# -- the sweep ----------------------------------------------------------------------------------

_BUILD = re.compile(r"^(?P<engine>.+)-(?P<backend>[a-z]+)-(?P<key>[0-9a-f]{16})$")
# What pylmserv itself puts in tmp/ (gc removes nothing else there: tmp/ may be a link to
# a shared scratch directory, whose other files are not ours):
_PARTIAL = re.compile(r"^(dl-[0-9a-f]+)\.(part|state\.json)$")  # a download's partial + state
_STAGING_PID = (re.compile(r"\.(\d+)\.[0-9a-f]{6,}\.tmp$"),  # blobs.temp_path, a state file's temp
                re.compile(r"^unpack-.+\.(\d+)$"),  # fetch's archive unpacking
                re.compile(r"^dl-[0-9a-f]+\.state\.json\.(\d+)\.tmp$"),  # a resume state being written
                # the download engine's temp files beside a staging path (blobs.temp_path)
                re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp\.(\d+)\.(?:\d+\.part|tmp)$"),
                re.compile(r"^gc-trash\.(\d+)\.[0-9a-f]{8}$"),  # a killed gc's trash
                re.compile(r"^tree\.(\d+)\..+\.[a-z0-9_]{8}$"))  # trees.ensure_source's work directory
_OUR_LOCK = re.compile(r"^(dl-[0-9a-f]+|[0-9a-f]{64}|[0-9a-df-np-sv-z]{52}-.+|cosmocc-.+|lockfile-.+)\.lock$")


def _entries(directory: Path) -> List[Path]:
    """What `directory` holds (following `directory` itself when it is a link: a layout
    directory linked elsewhere is the user's choice), never anything below the entries."""
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _real_dir(path: Path) -> bool:
    """A directory that is not a link (lstat): the only kind gc looks inside."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _current_keys(home: Path) -> Set[Tuple[str, str]]:
    """(engine-backend, key) of every `current` link under bin/."""
    out = set()
    for d in _entries(layout.bin_dir(home)):
        if not _real_dir(d):
            continue
        try:
            out.add((d.name, os.readlink(d / "current")))
        except OSError:
            pass
    return out


def _builds_to_keep(home: Path, keep: Keep, current: Set[Tuple[str, str]]) -> Set[str]:
    """Build dir names kept: each `current`, plus the keep_builds newest of every engine and
    backend among builds of rooted sources (or local --source trees)."""
    groups: Dict[str, List[Tuple[float, str]]] = {}
    kept = set()
    for d in _entries(layout.builds_dir(home)):
        m = _BUILD.match(d.name)
        if not m or not _real_dir(d):
            continue
        group = f"{m['engine']}-{m['backend']}"
        if (group, m["key"]) in current:
            kept.add(d.name)
        stamp = records.read_stamp(d / records.STAMP_NAME)
        if stamp is None:
            continue
        source = str(stamp.inputs.get("source", ""))
        if source in keep.build_sources or source.startswith("path:"):
            groups.setdefault(group, []).append((stamp.created, d.name))
    for items in groups.values():
        kept.update(name for _, name in sorted(items, reverse=True)[:max(0, keep.keep_builds)])
    return kept


def _model_kept(directory: Path, keep: Keep) -> bool:
    import json

    allowed = keep.models.get(directory.name)
    if allowed is None or not _real_dir(directory):  # a link in models/ is no entry of ours
        return False
    try:
        data = json.loads(read_state_text(directory / ".pylmserv.json"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or not isinstance(data.get("files") or {}, dict):
        return False  # an edited manifest: the entry is not known to be intact
    hexes = {str(m.get("sha256")) for m in (data.get("files") or {}).values() if isinstance(m, dict) and m.get("sha256")}
    archive = (data.get("archive") or {}).get("sha256") if isinstance(data.get("archive"), dict) else None
    if archive:
        hexes.add(str(archive))
    return bool(hexes) and hexes <= allowed


def plan(home: Path, keep: Keep) -> Tuple[List[Tuple[Item, Optional[Path]]], int]:
    """Garbage as (item, the lock to hold while deleting it), and how many things are kept."""
    home = Path(home)
    tmp = layout.tmp_root(home)
    out: List[Tuple[Item, Optional[Path]]] = []
    kept = 0

    def consider(kind: str, path: Path, lock: Optional[Path], garbage: bool, reason: str) -> None:
        nonlocal kept
        if garbage:
            out.append((Item(kind, path, tree_size(path), reason), lock))
        else:
            kept += 1

    for p in _entries(layout.blobs_dir("sha256", home)):
        consider("blob", p, tmp / f"{p.name}.lock", p not in keep.paths, "no root pins this hash")
    for p in _entries(layout.sources_dir(home)):
        consider("source", p, tmp / f"{p.name}.lock", p not in keep.paths, "no root pins this tree")
    for p in _entries(layout.toolchains_dir(home)):
        consider("toolchain", p, tmp / f"{p.name}.lock", p not in keep.paths, "no root pins this toolchain")
    for p in _entries(layout.models_dir(home)):
        consider("model", p, None, not _model_kept(p, keep), "no root names this model with these hashes")
    current = _current_keys(home)
    builds = _builds_to_keep(home, keep, current)
    for p in _entries(layout.builds_dir(home)):
        if p.name.endswith(".lock") and not os.path.islink(p):
            continue
        if not _real_dir(p):
            if os.path.islink(p):  # not ours: the link goes, never what it points at
                consider("build", p, None, True, LINK_REASON)
            continue
        consider("build", p, Path(str(p) + ".lock"), p.name not in builds,
                 f"not current and not among the {keep.keep_builds} newest of a rooted source")
    for group in _entries(layout.bin_dir(home)):
        if not _real_dir(group):
            if os.path.islink(group):
                consider("install", group, None, True, LINK_REASON)
            continue
        for p in _entries(group):
            if p.name == "current":
                continue
            if not _real_dir(p):
                if os.path.islink(p):
                    consider("install", p, None, True, LINK_REASON)
                continue
            garbage = (group.name, p.name) not in current and f"{group.name}-{p.name}" not in builds
            consider("install", p, layout.builds_dir(home) / f"{group.name}-{p.name}.lock", garbage,
                     "its build is gone or not kept")
    for p in _entries(tmp):
        if p.name.endswith(".lock"):
            continue
        m = _PARTIAL.match(p.name)
        if m:
            out.append((Item("partial", p, tree_size(p), "partial download of no running process"),
                        tmp / f"{m.group(1)}.lock"))
            continue
        pid = next((m.group(1) for m in (r.search(p.name) for r in _STAGING_PID) if m), None)
        if pid is None:
            continue  # not a name pylmserv writes: not ours to delete
        if _alive(int(pid)):
            kept += 1
            continue
        out.append((Item("staging", p, tree_size(p), "left over by a stopped pylmserv"), None))
    return out, kept


LINK_REASON = "a symlink where pylmserv keeps a directory (the link goes; what it points at stays)"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Locks:
    """Locks taken without waiting and held until the sweep ends (one flock per file).

    A lock file that is a link is not pylmserv's: opening it would truncate what it points
    at, so it is removed as a link (a dry run only looks: nothing is created or removed,
    and a lock file that does not exist is held by nobody)."""

    def __init__(self, dry_run: bool = False) -> None:
        self.held: Dict[str, object] = {}
        self.busy: Set[str] = set()
        self.dry_run = dry_run

    def take(self, lock_file: Path) -> bool:
        key = str(lock_file)
        if key in self.held:
            return True
        if key in self.busy:
            return False
        try:
            st = os.lstat(key)
        except FileNotFoundError:
            st = None
        except OSError:
            self.busy.add(key)
            return False
        if st is None and self.dry_run:
            return True
        if st is not None and not stat.S_ISREG(st.st_mode):
            if self.dry_run or not stat.S_ISLNK(st.st_mode):
                return self.dry_run
            remove_no_follow(key)
        lock = FileLock(key)
        try:
            lock.acquire(timeout=0)
        except LockTimeout:
            self.busy.add(key)
            return False
        self.held[key] = lock
        return True

    def release(self) -> None:
        for lock in self.held.values():
            lock.release()
        self.held.clear()


def sweep(home: Path, keep: Keep, dry_run: bool = False) -> Report:
    """Delete the garbage (dry_run: only report it)."""
    home = Path(home)
    report = Report(home=home, dry_run=dry_run)
    garbage, report.kept = plan(home, keep)
    locks = _Locks(dry_run)
    try:
        # Any pylmserv lock in tmp/ held elsewhere: something is in flight; its staging stays.
        quiet = all([locks.take(p) for p in _entries(layout.tmp_root(home)) if _OUR_LOCK.match(p.name)])
        for item, lock in garbage:
            free = quiet if item.kind == "staging" else (lock is None or locks.take(lock))
            (report.garbage if free else report.in_use).append(item)
        report.freed = freed_bytes(i.path for i in report.garbage)
        if not dry_run:
            for item in report.garbage:
                _remove(item.path, home)
    finally:
        locks.release()
    report.store_size = store_size(home)
    return report


def store_size(home: Path) -> int:
    """Bytes under the store (hardlinks counted once)."""
    return freed_bytes([Path(home)]) if Path(home).exists() else 0

