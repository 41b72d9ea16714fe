"""`prefetch`: resolve pylmserv.toml into pylmserv.lock (or check the lock for drift).

Every selected entry is resolved first; the lock is written once, atomically, and only
when all of them succeeded, so any error leaves the old lock byte-for-byte in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Union

from ..core.errors import UsageError
from ..core.fsutil import temp_dir
from ..core.log import get_logger
from .config import LOCK_NAME, Config, default_config_path, load_config
from .drift import pin_drift
from .lock import Lock, LockEntry, load_lock
from .lockfile import refuse_packaged, update
from .resolvers import git, github, hf, url
from .resolvers.base import BACKENDS, Options

log = get_logger("pylmserv.prefetch")


@dataclass(frozen=True)
class Change:
    kind: str  # sources | models
    name: str
    old: Optional[LockEntry]
    new: Optional[LockEntry]  # None: removed from the lock

    @property
    def status(self) -> str:
        if self.old is None:
            return "added"
        if self.new is None:
            return "removed"
        return "unchanged" if self.old.to_table() == self.new.to_table() else "updated"

    def describe(self) -> str:
        if self.status == "added":
            return f"{self.kind}.{self.name}: added {_pin(self.new)}"
        if self.status == "removed":
            return f"{self.kind}.{self.name}: removed (no longer in the config)"
        if self.status == "unchanged":
            return f"{self.kind}.{self.name}: unchanged {_pin(self.new)}"
        return f"{self.kind}.{self.name}: {_pin(self.old)} -> {_pin(self.new)}"


@dataclass(frozen=True)
class Drift:
    kind: str
    name: str
    fields: List[str]  # what differs: hash, rev, url, size, missing
    locked: Optional[LockEntry]
    actual: LockEntry

    def describe(self) -> str:
        if self.locked is None:
            return f"{self.kind}.{self.name}: not in the lock (would pin {_pin(self.actual)})"
        parts = [f"{f} {getattr(self.locked, f)} -> {getattr(self.actual, f)}" for f in self.fields]
        return f"{self.kind}.{self.name}: " + ", ".join(parts)


@dataclass(frozen=True)
class PrefetchResult:
    lock_path: Optional[Path]
    changes: List[Change] = field(default_factory=list)
    drift: List[Drift] = field(default_factory=list)
    written: bool = False
    checked: bool = False

    @property
    def changed(self) -> List[Change]:
        return [c for c in self.changes if c.status != "unchanged"]

    def to_json(self) -> dict:
        return {
            "lock": str(self.lock_path) if self.lock_path else None,
            "written": self.written,
            "checked": self.checked,
            "changes": [{"kind": c.kind, "name": c.name, "status": c.status,
                         "old": c.old.to_table() if c.old else None,
                         "new": c.new.to_table() if c.new else None} for c in self.changes],
            "drift": [{"kind": d.kind, "name": d.name, "fields": d.fields,
                       "locked": d.locked.to_table() if d.locked else None,
                       "actual": d.actual.to_table()} for d in self.drift],
        }


def _pin(entry: Optional[LockEntry]) -> str:
    if entry is None:
        return "-"
    rev = f"{entry.rev[:12]} " if entry.rev else ""
    return f"{rev}{entry.hash.sri}"


def prefetch(names: Optional[Iterable[str]] = None, config: Union[Path, str, Config, None] = None,
             lock: Union[Path, str, Lock, None] = None, via: str = "auto", check: bool = False,
             refresh: bool = False) -> PrefetchResult:
    """Resolve refs and compute Nix-exact hashes for `names` (default: all); write the lock.

    check=True recomputes everything selected, writes nothing and reports drift.
    refresh=True refetches even entries whose ref still resolves to the locked rev.
    """
    if via not in BACKENDS:
        raise UsageError(f"unknown backend {via!r}", hint="Use one of: " + ", ".join(BACKENDS))
    cfg = config if isinstance(config, Config) else load_config(Path(config) if config else default_config_path())
    if isinstance(lock, Lock):
        current = lock
    else:
        lock_path = Path(lock) if lock else (cfg.path or Path.cwd() / "x").with_name(LOCK_NAME)
        current = load_lock(lock_path)
    selected = _select(cfg, names)
    if not check:
        refuse_packaged(current.path)
    with temp_dir(prefix="pylmserv-prefetch.") as work:
        opts = Options(via=via, refresh=refresh or check, work=work)
        resolved = [_resolve(kind, spec, current.entry(kind, spec.name), opts) for kind, spec in selected]
    changes = [Change(e.kind, e.name, current.entry(e.kind, e.name), e) for e in resolved]
    if check:
        drift = [Drift(e.kind, e.name, f, current.entry(e.kind, e.name), e)
                 for e in resolved for f in [pin_drift(current.entry(e.kind, e.name), e)] if f]
        return PrefetchResult(current.path, changes, drift, written=False, checked=True)

    def merge(found: Lock) -> Lock:
        # Another prefetch may have written other names meanwhile: keep them, add ours.
        merged = found
        for entry in resolved:
            merged = merged.with_entry(entry)
            other = "models" if entry.kind == "sources" else "sources"
            if entry.name not in getattr(cfg, other):  # a name that moved kinds leaves no pin behind
                merged = merged.without(other, entry.name)
        if names is None:  # a full prefetch also drops pins whose config entry is gone
            for kind in ("sources", "models"):
                for n in [n for n in getattr(found, kind) if n not in getattr(cfg, kind)]:
                    merged = merged.without(kind, n)
        return merged

    found, new_lock, written = update(current.path, merge)
    changes = [Change(e.kind, e.name, found.entry(e.kind, e.name), e) for e in resolved]
    if names is None:
        changes += [Change(kind, n, found.entry(kind, n), None) for kind in ("sources", "models")
                    for n in getattr(found, kind) if n not in getattr(cfg, kind)]
    return PrefetchResult(new_lock.path, changes, [], written=written)


def _select(cfg: Config, names: Optional[Iterable[str]]) -> list:
    everything = [("sources", s) for s in cfg.sources.values()] + [("models", m) for m in cfg.models.values()]
    if names is None:
        return everything
    names = list(names)
    known = {spec.name: (kind, spec) for kind, spec in everything}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown name(s): {', '.join(unknown)}", hint="Known: " + ", ".join(sorted(known)))
    return [known[n] for n in dict.fromkeys(names)]


def _resolve(kind: str, spec, locked: Optional[LockEntry], opts: Options) -> LockEntry:
    if kind == "models":
        if spec.hf:
            entry = hf.resolve(spec, locked, opts)
        else:
            entry = url.resolve_model(spec, locked, opts)
    else:
        entry = {"github": github, "git": git, "url": url}[spec.type].resolve(spec, locked, opts)
    log.debug("%s.%s: %s", kind, spec.name, entry.hash.sri)
    return entry
