"""Replaying an up-to-date `pylmserv build` without loading the command line or the builders.

Importing click, the lock's types and the builders costs more than Python's own start,
so an up-to-date build (issue 14: within Python start + 100 ms) cannot afford them. When a
build answered "up to date", the command line records here what it printed, keyed by the
invocation (arguments, working directory, environment, interpreter, pylmserv's own code),
with everything that answer depended on:

  files     the config, the lock and the config the search would have found instead
            (content digests; None = absent)
  probed    the paths the build's stat-only detections looked at (OpenSSL, BLAS headers)
  stamp     the build's stamp and key (records.is_up_to_date: outputs still unchanged)
  install   what to re-install (stat calls when unchanged) and the `current` link

`pylmserv` (pylmserv/__main__.py) calls replay() first: when every check still holds, it
re-installs, prints what was recorded and stops; on any difference (or any error) it
returns False and the full command runs, which records again. The builder decides what
may be replayed (builds whose key needs no probe beyond stat: not cuda/rocm/auto/--source/
--force); this module only re-checks and repeats.

Imports only the standard library and the store's light modules.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..core.fsutil import atomic_write_text
from . import installs, records, roots
from .layout import home as store_home

VERSION = 1
DIR = "replay"
VOLATILE_ENV = frozenset({"_", "OLDPWD", "PWD", "SHLVL"})  # change between shells, never a build's input
JSON_STYLE = {"indent": 2, "sort_keys": True, "default": str}  # how `build --json` prints (cli/build.py)

# This process's arguments and their invocation_key(), set by replay() (computed once per process)
_invocation: Optional[Tuple[List[str], str]] = None


def file_digest(path) -> Optional[str]:
    """sha256 of a (small) file's content; None when it does not exist."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _code_fingerprint() -> List[list]:
    """pylmserv's own files (name, size, mtime): another version or an edited checkout may
    map the same arguments to another build."""
    root = Path(__file__).resolve().parent.parent
    out = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".toml", ".lock")):
                st = os.stat(os.path.join(directory, name))
                out.append([os.path.relpath(os.path.join(directory, name), root), st.st_size, st.st_mtime_ns])
    return out


def invocation_key(argv: Sequence[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in VOLATILE_ENV}
    doc = {"argv": list(argv), "cwd": os.getcwd(), "env": env, "python": [sys.executable, sys.version],
           "code": _code_fingerprint()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8", "surrogateescape")).hexdigest()


def _record_path(key: str, home: Optional[Path] = None) -> Path:
    return Path(home or store_home()) / DIR / f"{key}.json"


def remember(checks: dict, stderr: str, data: Optional[dict] = None) -> Optional[Path]:
    """Record what an up-to-date build prints (its text on stderr; `data`, printed on stdout,
    for --json) with the builder's `checks`. Only for the invocation replay() looked up; never
    fails the command."""
    if _invocation is None or not checks:
        return None
    try:
        argv, key = _invocation
        doc = {"version": VERSION, "argv": argv, **checks, "stderr": stderr,
               "json": json.loads(json.dumps(data, default=str)) if data is not None else None}
        path = _record_path(key)
        atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True), durable=False)  # a cache
        return path
    except (OSError, TypeError, ValueError):
        return None


def _up_to_date_stamp(doc: dict) -> Optional[records.Stamp]:
    """The build's stamp when every check of the record still holds."""
    if doc.get("version") != VERSION:
        return None
    if any(file_digest(p) != digest for p, digest in doc["files"].items()):
        return None
    if any(os.path.exists(p) != bool(found) for p, found in doc["probed"].items()):
        return None
    stamp = records.read_stamp(Path(doc["stamp"]))
    ok = stamp is not None and stamp.key == doc["key"] and records.is_up_to_date(stamp, doc["install"])
    return stamp if ok else None


def replay(argv: Sequence[str]) -> bool:
    """Print a recorded up-to-date build again when nothing it depended on changed; False
    (nothing printed) otherwise, and then the command that runs may remember() its answer."""
    global _invocation
    t0 = time.monotonic()
    if "build" not in argv:
        return False
    try:
        key = invocation_key(argv)
        _invocation = (list(argv), key)
        doc = json.loads(_record_path(key).read_text(encoding="utf-8"))
        stamp = _up_to_date_stamp(doc) if doc.get("argv") == list(argv) else None
        if stamp is None:
            return False
        outputs = stamp.output_paths()
        installs.install_files({n: outputs[n] for n in doc["install"]}, Path(doc["bindir"]),
                               with_libs=Path(doc["libs"]) if doc.get("libs") else None)
        if doc.get("current"):
            installs.point_current(Path(doc["current"]))
        if doc.get("lock"):
            roots.register_lock(Path(doc["lock"]))  # a gc root, as when the full command reads it
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if doc.get("json") is not None:
        data = dict(doc["json"], seconds=round(time.monotonic() - t0, 3))
        sys.stdout.write(json.dumps(data, **JSON_STYLE) + "\n")
    sys.stderr.write(doc.get("stderr") or "")
    return True


def forget_stale(home: Optional[Path] = None) -> int:
    """Drop records whose build stamp is gone (gc removed the build); returns how many."""
    directory = Path(home or store_home()) / DIR
    n = 0
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            stale = not Path(json.loads(path.read_text(encoding="utf-8"))["stamp"]).exists()
        except (OSError, ValueError, KeyError, TypeError):
            stale = True
        if stale:
            try:
                path.unlink()
                n += 1
            except OSError:
                pass
    return n
