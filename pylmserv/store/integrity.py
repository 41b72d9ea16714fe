"""Rot detection and repair: re-hash what the store holds against the hash it is kept by.

  blobs/sha256/<hex>          the file's sha256 must be <hex>
  sources/<nix32>-<name>      the tree's NAR hash (sha256) must be <nix32>
  models/<name>/              every file the manifest lists is there with its size; a
                              file linked from a blob is that blob's bytes; nothing else
                              (no file, and no symlink leaving the folder) was added

A bad entry is moved aside to quarantine/<time>-<what> (never deleted: the bytes may be
evidence, or all that is left), together with every named entry that uses a bad blob.
The next `fetch`/`build` sees it missing and restores it from its pin. Each run records
its time and result in verified.json, which `doctor` reports.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from ..core.errors import PylmservError, RotFound  # noqa: F401 (RotFound: re-exported)
from ..core.fsutil import atomic_write_text, read_state_text, walk_no_follow
from ..core.hashing import Hash, file_hash, nix32_decode
from ..core.nar import nar_hash
from . import blobs as store
from .layout import ensure_home

RECORD = "verified.json"
QUARANTINE = "quarantine"
OK, BAD, MISSING = "ok", "bad", "missing"


@dataclass
class Finding:
    kind: str  # blob | source | model
    name: str  # hex of a blob, source name, model name
    path: Path
    status: str  # ok | bad
    detail: str = ""
    expected: Optional[str] = None
    got: Optional[str] = None
    moved_to: Optional[Path] = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "path": str(self.path), "status": self.status,
                "detail": self.detail, "expected": self.expected, "got": self.got,
                "moved_to": str(self.moved_to) if self.moved_to else None}


@dataclass
class Report:
    findings: List[Finding] = field(default_factory=list)
    checked_at: float = 0.0
    not_recorded: str = ""  # why verified.json could not be written (a read-only store)

    @property
    def bad(self) -> List[Finding]:
        return [f for f in self.findings if f.status == BAD]

    def to_json(self) -> dict:
        return {"checked_at": _iso(self.checked_at), "checked": sum(f.status != MISSING for f in self.findings),
                "bad": len(self.bad),
                "entries": [f.to_json() for f in self.findings]}


def verify_store(names: Iterable[str] = (), home: Optional[Path] = None, repair: bool = True) -> Report:
    """Re-hash blobs, source trees and model entries (only those of `names`, when given)."""
    home = Path(home) if home else ensure_home()
    wanted = set(names)
    report = Report(checked_at=time.time())
    entries = _model_entries(home, wanted)
    sources = _source_trees(home, wanted)
    if wanted:
        unknown = wanted - set(entries) - {name for name, _ in sources.values()}
        for name in sorted(unknown):
            report.findings.append(Finding("model", name, home / "models" / name, MISSING,
                                           "not in the store (nothing to verify)"))
    needed = None
    if wanted:
        needed = {h for files in entries.values() for h in files.values() if h} | _archive_blobs(entries, home)
    bad_blobs = set()
    for name, path in _blob_files(home):
        if needed is not None and name not in needed:
            continue
        finding = _check_blob(name, path)
        if finding.status != OK:
            bad_blobs.add(name)
        report.findings.append(finding)
    for path, (name, h) in sorted(sources.items()):
        report.findings.append(_check_source(name, h, path))
    for name in sorted(entries):
        report.findings.append(_check_model(name, home / "models" / name, entries[name], bad_blobs, home))
    if repair:
        for finding in report.bad:
            if os.path.lexists(finding.path):
                try:
                    finding.moved_to = _quarantine(finding, home)
                except OSError as exc:  # a read-only store, quarantine/ on another disk: say so
                    why = ("quarantine/ is on another filesystem" if exc.errno == errno.EXDEV
                           else exc.strerror or str(exc))
                    finding.detail += f"; left in place, cannot be moved aside: {why}"
    try:
        _record(report, home)
    except OSError as exc:  # a read-only store is still verified: only the record is lost
        report.not_recorded = exc.strerror or str(exc)
    return report


def last_verified(home: Optional[Path] = None) -> Optional[dict]:
    """What the last `verify` recorded ({checked_at, checked, bad, names}), or None."""
    home = Path(home) if home else ensure_home()
    try:
        data = json.loads(read_state_text(home / RECORD))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "checked_at" in data else None


# -- what is there -----------------------------------------------------------------------

def _model_entries(home: Path, wanted: set) -> Dict[str, Dict[str, Optional[str]]]:
    """name -> {filename: blob hex or None (unpacked from an archive)} of models/."""
    out = {}
    base = home / "models"
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        if d.name.startswith(".") or (wanted and d.name not in wanted) or not d.is_dir() or d.is_symlink():
            continue
        out[d.name] = {rel: meta.get("sha256") for rel, meta in _manifest(d).get("files", {}).items()
                       if isinstance(meta, dict)}
    return out


def _archive_blobs(entries, home: Path) -> set:
    hexes = set()
    for name in entries:
        archive = _manifest(home / "models" / name).get("archive")
        if isinstance(archive, dict) and isinstance(archive.get("sha256"), str):
            hexes.add(archive["sha256"])
    return hexes


def _manifest(directory: Path) -> dict:
    try:
        data = json.loads(read_state_text(directory / store.MANIFEST))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if not isinstance(data.get("files", {}), dict):  # an edited manifest: no files known
        data = dict(data, files={})
    return data


_SOURCE = re.compile(r"^([0-9a-df-np-sv-z]{52})-(.+)$")


def _source_trees(home: Path, wanted: set) -> Dict[Path, tuple]:
    out = {}
    base = home / "sources"
    if not base.is_dir():
        return out
    for p in sorted(base.iterdir()):
        m = _SOURCE.match(p.name)
        if not m or (wanted and m.group(2) not in wanted):
            continue
        try:
            h = Hash("sha256", nix32_decode(m.group(1), 32))
        except ValueError:
            continue
        out[p] = (m.group(2), h)
    return out


# -- checks -------------------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def _blob_files(home: Path):
    """(name, path) of everything in blobs/sha256/ but pylmserv's own dot-files: files,
    links (dangling ones included) and anything else that sits where only blobs belong."""
    base = home / "blobs" / "sha256"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    return [(n, base / n) for n in names if not n.startswith(".")]


def _check_blob(name: str, path: Path) -> Finding:
    shown = name if len(name) <= 80 else name[:80] + "..."
    if not _HEX64.match(name):
        return Finding("blob", shown, path, BAD, "not a blob: the name is not a sha256 (64 lowercase hex digits)")
    h = Hash("sha256", bytes.fromhex(name))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Finding("blob", h.hex, path, BAD, "a dangling symlink" if os.path.islink(path) else "vanished", h.hex)
    except OSError as exc:
        return Finding("blob", h.hex, path, BAD, f"unreadable: {exc.strerror}", h.hex)
    if not stat.S_ISREG(st.st_mode):
        return Finding("blob", h.hex, path, BAD, "not a regular file", h.hex)
    try:
        got = file_hash(path, h.algo)
    except OSError as exc:
        return Finding("blob", h.hex, path, BAD, f"unreadable: {exc.strerror}", h.hex)
    if got != h:
        return Finding("blob", h.hex, path, BAD, "content does not match its hash", h.hex, got.hex)
    return Finding("blob", h.hex, path, OK, f"{path.stat().st_size} bytes", h.hex, got.hex)


def _check_source(name: str, h: Hash, path: Path) -> Finding:
    try:
        got = nar_hash(path, h.algo)
    except (OSError, PylmservError, RecursionError) as exc:
        return Finding("source", name, path, BAD, f"cannot be hashed: {exc}", h.sri)
    if got != h:
        return Finding("source", name, path, BAD, "tree does not match its NAR hash", h.sri, got.sri)
    return Finding("source", name, path, OK, "NAR hash matches", h.sri, got.sri)


def _check_model(name: str, directory: Path, files: Dict[str, Optional[str]], bad_blobs: set,
                 home: Path) -> Finding:
    def bad(detail: str) -> Finding:
        return Finding("model", name, directory, BAD, detail)

    manifest = _manifest(directory)
    if not files:
        return bad("no manifest: the entry is incomplete")
    sizes = {rel: meta.get("size") for rel, meta in manifest.get("files", {}).items() if isinstance(meta, dict)}
    for rel, hexd in files.items():
        if not store.inside_name(rel):  # an edited manifest: never read a file outside the entry
            return bad("the manifest names a file outside the entry")
        if hexd is not None and not (isinstance(hexd, str) and re.fullmatch(r"[0-9a-f]{64}", hexd)):
            return bad(f"the manifest's sha256 of {rel} is not 64 hex digits")
        path = directory / rel
        try:
            st = os.stat(path)  # a symlink entry (link mode symlink) is judged by its target
        except OSError:
            return bad(f"{rel} is missing")
        if not stat.S_ISREG(st.st_mode) or st.st_size != sizes.get(rel):
            return bad(f"{rel} is not the recorded {sizes.get(rel)}-byte file")
        if hexd:
            if hexd in bad_blobs:
                return bad(f"{rel} is linked to a bad blob")
            blob = store.blob_path(Hash("sha256", bytes.fromhex(hexd)), home)
            if not _same_file(path, blob) and file_hash(path).hex != hexd:
                return bad(f"{rel} does not match sha256 {hexd}")
    archive = manifest.get("archive")
    if isinstance(archive, dict) and archive.get("sha256") in bad_blobs:
        return bad("unpacked from an archive blob that is bad")
    root = os.path.realpath(directory)
    listed = set(files) | {store.MANIFEST}
    for dirpath, dirnames, filenames in walk_no_follow(directory):
        for entry in dirnames + filenames:
            path = os.path.join(dirpath, entry)
            rel = os.path.relpath(path, directory)
            if os.path.islink(path):
                real = os.path.realpath(path)
                if not (real == root or real.startswith(root + os.sep)):
                    return bad(f"{rel} is a symlink leaving the model folder")
            elif entry in filenames and rel not in listed:
                return bad(f"{rel} is not part of the entry")
    return Finding("model", name, directory, OK, f"{len(files)} file(s)")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# -- repair and record ----------------------------------------------------------------------

def _quarantine(finding: Finding, home: Path) -> Path:
    base = home / QUARANTINE
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = base / f"{stamp}-{finding.kind}-{finding.path.name}"
    n = 1
    while os.path.lexists(target):
        n += 1
        target = base / f"{stamp}-{finding.kind}-{finding.path.name}.{n}"
    os.replace(finding.path, target)  # same filesystem: a rename, nothing is lost
    return target


def _record(report: Report, home: Path) -> None:

    data = report.to_json()
    data.pop("entries")
    atomic_write_text(home / RECORD, json.dumps(data, sort_keys=True) + "\n")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
