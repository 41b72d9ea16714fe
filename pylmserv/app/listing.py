"""What `pylmserv list` shows: catalog entries, their pins, what is fetched and built.

Read-only and cheap: no hashing (the store's manifest says which blob a named entry
is, and blobs are verified before they are installed), no network, no tool probes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from ..pins.config import Project
from ..pins.drift import config_drift
from ..store import blobs as store
from ..store import layout as paths
from ..store.trees import store_path
from .link import linked as live_links

ENGINES = ("llama.cpp", "llamafile")
# Which catalog source each engine is built from.
ENGINE_SOURCES = {"llama-cpp": "llama.cpp", "llamafile": "llamafile"}


@dataclass(frozen=True)
class Built:
    engine: str
    backend: str
    path: Path  # the directory `current` points at
    binaries: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"engine": self.engine, "backend": self.backend, "path": str(self.path),
                "binaries": list(self.binaries)}


@dataclass(frozen=True)
class Entry:
    kind: str  # "model" | "source"
    name: str
    description: str = ""
    locked: bool = False
    pin: Optional[str] = None  # rev for sources, sha256 (hex) for models
    size: Optional[int] = None  # from the lock
    fetched_path: Optional[Path] = None
    fetched_size: Optional[int] = None
    stale: bool = False  # fetched, but not the bytes the lock pins now
    drift: Tuple[str, ...] = ()  # how the lock's pin differs from what the config asks (pins.drift)
    built: Tuple[Built, ...] = field(default_factory=tuple)

    @property
    def fetched(self) -> bool:
        return self.fetched_path is not None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "name": self.name, "description": self.description, "locked": self.locked,
            "pin": self.pin, "size": self.size, "drift": list(self.drift),
            "fetched": {"path": str(self.fetched_path), "size": self.fetched_size, "stale": self.stale}
            if self.fetched_path else None,
            "built": [b.to_dict() for b in self.built],
        }


def builds(home: Path) -> List[Built]:
    """Installed builds: bin/<engine>-<backend>/current -> <key>/ (the builder's layout)."""
    base = paths.bin_dir(home)
    out: List[Built] = []
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        engine = next((e for e in ENGINES if d.name.startswith(e + "-")), None)
        if engine is None:
            continue
        # llama.cpp: <engine>-<backend>/current -> <key>/; llamafile: <engine>-<backend>/bin/
        current = d / "current"
        target = current.resolve() if current.exists() else d
        if not any(True for _ in _executables(target)):
            continue
        names = tuple(sorted(p.name for p in _executables(target)))
        out.append(Built(engine, d.name[len(engine) + 1:], target, names))
    return out


def _executables(directory: Path):
    for sub in (directory, directory / "bin"):
        if sub.is_dir():
            for p in sub.iterdir():
                if p.is_file() and os.access(p, os.X_OK) and not p.name.endswith((".so", ".dylib", ".dll")) \
                        and ".so." not in p.name:
                    yield p


def linked(home: Optional[Path] = None) -> List[dict]:
    """Models laid out for other tools by `pylmserv link` whose links still exist."""
    out = []
    for l in live_links(home):
        paths = [m.path for m in l.made if m.how in ("hardlink", "symlink")] + list(l.kept)
        out.append({"name": l.name, "layout": l.layout, "root": l.root, "paths": paths})
    return out


def entries(project: Project, home: Optional[Path] = None) -> List[Entry]:
    """Every model and source of the config (and any the lock pins beyond it)."""
    home = Path(home) if home else paths.home()
    cfg, lock = project.config, project.lock
    all_builds = builds(home) if home.exists() else []
    out: List[Entry] = []
    for name in sorted(set(cfg.models) | set(lock.models)):
        spec, pin = cfg.models.get(name), lock.models.get(name)
        fetched = store.lookup(name, home) if paths.models_dir(home).is_dir() else None
        stale = bool(fetched and pin is not None and fetched.files[0].sha256 != pin.hash)
        out.append(Entry(
            "model", name, description=spec.description if spec else "", locked=pin is not None,
            pin=pin.hash.hex if pin else None, size=pin.size if pin else (spec.size if spec else None),
            fetched_path=fetched.path if fetched else None, fetched_size=fetched.size if fetched else None,
            stale=stale, drift=tuple(config_drift(spec, pin)) if spec and pin else ()))
    for name in sorted(set(cfg.sources) | set(lock.sources)):
        spec, pin = cfg.sources.get(name), lock.sources.get(name)
        engine = ENGINE_SOURCES.get(name)
        built = tuple(b for b in all_builds if b.engine == engine) if engine else ()
        description = str(spec.meta.get("description", "")) if spec else ""
        rev = (pin.rev or getattr(pin, "ref", None) or getattr(pin, "version", None)) if pin else None
        fetched_path = fetched_size = None
        if pin is not None:
            where = store_path(pin, home)
            if where.exists():
                fetched_path = where
                fetched_size = where.stat().st_size if where.is_file() else None
        out.append(Entry("source", name, description=description, locked=pin is not None,
                         pin=rev or (pin.hash.sri if pin else None), size=pin.size if pin else None,
                         fetched_path=fetched_path, fetched_size=fetched_size, built=built,
                         drift=tuple(config_drift(spec, pin)) if spec and pin else ()))
    return out
