"""Build keys and stamps: "is this build already done?" answered with stat() calls only.

A build key is a short hash of a dict of inputs (source hash, backend, options, ...).
A stamp is a small JSON file written after a successful build: the inputs it was made
from and the outputs (path, size, mtime) it produced. A build is up to date when the
stamp exists, its inputs equal the requested ones, and every output is still there
unchanged. Generic on purpose: the llama.cpp and llamafile builders both use it.

Imports only the standard library: the up-to-date fast path must stay cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Iterable, Mapping, NamedTuple, Optional

from ..core.fsutil import atomic_write_text, read_state_text, unlink_missing_ok

STAMP_VERSION = 1
STAMP_NAME = "pylmserv-stamp.json"


def canonical_json(inputs: Mapping) -> str:
    """Stable text for a dict of inputs (sorted keys, no whitespace variance)."""
    return json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)


def build_key(inputs: Mapping, length: int = 16) -> str:
    """A short, filesystem-safe key: the same inputs always give the same key."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()[:length]


class OutputRecord(NamedTuple):  # not a dataclass: cheaper to create on the up-to-date `build` path
    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "OutputRecord":
        st = os.stat(path)
        return cls(str(path), st.st_size, st.st_mtime_ns)

    def still_there(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


class Stamp:
    """One build's record (a plain class, for the reason OutputRecord gives)."""

    __slots__ = ("key", "inputs", "outputs", "created", "seconds", "extra")

    def __init__(self, key: str, inputs: Dict[str, object], outputs: Dict[str, OutputRecord], created: float = 0.0,
                 seconds: float = 0.0, extra: Optional[Dict[str, object]] = None):
        self.key = key
        self.inputs = inputs
        self.outputs = outputs  # name -> record
        self.created = created
        self.seconds = seconds  # how long the build took
        self.extra = extra if extra is not None else {}

    def __eq__(self, other) -> bool:
        return isinstance(other, Stamp) and all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None  # mutable dicts inside

    def __repr__(self) -> str:
        return f"Stamp(key={self.key!r}, outputs={sorted(self.outputs)!r}, seconds={self.seconds!r})"

    def to_json(self) -> str:
        doc = {
            "version": STAMP_VERSION,
            "key": self.key,
            "inputs": self.inputs,
            "outputs": {n: r._asdict() for n, r in sorted(self.outputs.items())},
            "created": self.created,
            "seconds": self.seconds,
            "extra": self.extra,
        }
        return json.dumps(doc, sort_keys=True, indent=2, default=str) + "\n"

    def output_paths(self) -> Dict[str, Path]:
        return {n: Path(r.path) for n, r in self.outputs.items()}


def make_stamp(inputs: Mapping, outputs: Mapping[str, Path], seconds: float = 0.0,
               extra: Optional[Mapping] = None) -> Stamp:
    """Record `outputs` (name -> existing path) as produced from `inputs`."""
    inputs = json.loads(canonical_json(inputs))  # normalise (tuples -> lists, Paths -> str)
    return Stamp(key=build_key(inputs), inputs=inputs,
                 outputs={n: OutputRecord.of(Path(p)) for n, p in outputs.items()},
                 created=time.time(), seconds=seconds, extra=dict(extra or {}))


def read_stamp(path: Path) -> Optional[Stamp]:
    """The stamp at `path`, or None when it is missing, unreadable or from another format."""
    try:
        doc = json.loads(read_state_text(path))
        if doc.get("version") != STAMP_VERSION:
            return None
        outputs = {n: OutputRecord(str(r["path"]), int(r["size"]), int(r["mtime_ns"]))
                   for n, r in doc["outputs"].items()}
        return Stamp(key=doc["key"], inputs=doc["inputs"], outputs=outputs,
                     created=float(doc.get("created", 0)), seconds=float(doc.get("seconds", 0)),
                     extra=dict(doc.get("extra") or {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_stamp(path: Path, stamp: Stamp) -> Path:
    """Atomic: a killed write leaves either the old stamp or none, never half a stamp."""
    path = Path(path)
    atomic_write_text(path, stamp.to_json())
    return path


def remove_stamp(path: Path) -> None:
    unlink_missing_ok(path)


def newest_build(build_dirs: Iterable[Path], inputs: Mapping, output: str) -> Optional[Stamp]:
    """Of the stamps in `build_dirs`, the newest made from `inputs` (every key given must
    match) that produced `output`, with all its outputs still in place."""
    best = None
    for directory in build_dirs:
        stamp_file = Path(directory) / STAMP_NAME
        stamp = read_stamp(stamp_file)
        if stamp is None or output not in stamp.outputs:
            continue
        if any(stamp.inputs.get(k) != v for k, v in inputs.items()):
            continue
        if not all(r.still_there() for r in stamp.outputs.values()):
            continue
        mtime = stamp_file.stat().st_mtime
        if best is None or mtime > best[0]:
            best = (mtime, stamp)
    return best[1] if best else None


def is_up_to_date(stamp: Optional[Stamp], outputs: Optional[Iterable] = None,
                  inputs: Optional[Mapping] = None) -> bool:
    """True when `stamp` matches `inputs` (if given) and its outputs are all unchanged.

    `outputs` (names or paths) must all be among the stamp's recorded outputs; when
    omitted, every recorded output is checked.
    """
    if stamp is None:
        return False
    if inputs is not None and stamp.key != build_key(json.loads(canonical_json(inputs))):
        return False
    records = list(stamp.outputs.values())
    if outputs is not None:
        by_name = stamp.outputs
        by_path = {r.path: r for r in records}
        records = []
        for o in outputs:
            rec = by_name.get(str(o)) or by_path.get(str(o))
            if rec is None:
                return False
            records.append(rec)
    return bool(records) and all(r.still_there() for r in records)
