"""What a build returns (both engines): installed binaries, where, and how it went."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple


_FIELDS = ("what", "backend", "binaries", "build_dir", "prefix", "seconds", "cache_hit", "key", "source", "commands",
           "detected", "notes", "dry_run", "current", "auto", "sha256")


class BuildResult:
    """Immutable. A plain class, not a frozen dataclass: every up-to-date `build` imports it
    (a dataclass of this size costs ~5 M instructions to create)."""

    __slots__ = _FIELDS
    what: str
    backend: str
    binaries: Dict[str, Path]  # target -> installed path
    build_dir: Path
    prefix: Path
    seconds: float
    cache_hit: bool
    key: str
    source: Optional[Path]
    commands: Tuple[str, ...]  # configure + build, one shell-quoted line each
    detected: Tuple[str, ...]  # what the toolchain detection found (dry runs, -v)
    notes: Tuple[str, ...]  # warnings and mapping decisions worth telling the user
    dry_run: bool
    current: Optional[Path]  # the `current` link of this engine/backend, default prefix only
    auto: Optional[str]  # --backend auto: what it chose and why
    sha256: Dict[str, str]  # shipped file name -> sha256 hex, as built

    def __init__(self, what: str, backend: str, binaries: Dict[str, Path], build_dir: Path, prefix: Path,
                 seconds: float, cache_hit: bool, key: str = "", source: Optional[Path] = None,
                 commands: Tuple[str, ...] = (), detected: Tuple[str, ...] = (), notes: Tuple[str, ...] = (),
                 dry_run: bool = False, current: Optional[Path] = None, auto: Optional[str] = None,
                 sha256: Optional[Dict[str, str]] = None):
        values = (what, backend, binaries, build_dir, prefix, seconds, cache_hit, key, source, commands, detected,
                  notes, dry_run, current, auto, {} if sha256 is None else sha256)
        for name, value in zip(_FIELDS, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to field {name!r}: a BuildResult is immutable")

    __delattr__ = __setattr__

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in _FIELDS)

    def replace(self, **changes) -> "BuildResult":
        """A copy with `changes` (as dataclasses.replace)."""
        values = dict(zip(_FIELDS, self._values()))
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"BuildResult has no field(s) {', '.join(sorted(unknown))}")
        values.update(changes)
        return BuildResult(**values)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # holds dicts: unhashable, as the dataclass was in practice

    def __repr__(self) -> str:
        return "BuildResult(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS) + ")"

    @property
    def paths(self) -> Dict[str, Path]:
        return self.binaries

    def to_json(self) -> dict:
        return {
            "what": self.what, "backend": self.backend, "cache_hit": self.cache_hit,
            "seconds": round(self.seconds, 3), "build_dir": str(self.build_dir), "prefix": str(self.prefix),
            "paths": {k: str(v) for k, v in sorted(self.binaries.items())}, "key": self.key,
            "source": str(self.source) if self.source else None, "commands": list(self.commands),
            "current": str(self.current) if self.current else None, "notes": list(self.notes),
            "dry_run": self.dry_run, "auto": self.auto, "sha256": dict(sorted(self.sha256.items())),
        }
