"""What a build returns (both engines): installed binaries, where, and how it went."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from ..core.record import Factory, Record


class BuildResult(Record):
    """Immutable (a Record: every up-to-date `build` imports it)."""

    __slots__ = ("what", "backend", "binaries", "build_dir", "prefix", "seconds", "cache_hit", "key", "source",
                 "commands", "detected", "notes", "dry_run", "current", "auto", "sha256")
    _defaults = {"key": "", "source": None, "commands": (), "detected": (), "notes": (), "dry_run": False,
                 "current": None, "auto": None, "sha256": Factory(dict)}
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
