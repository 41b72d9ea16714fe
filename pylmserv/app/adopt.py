"""`pylmserv adopt`: scan other tools' caches once for every locked model not in the store.

Per locked model (and each shard): where a verified copy is, and how many bytes adopting it
saves; without --dry-run, the copies are linked into the store (store/adopt: hard link,
reflink, copy) and the model's named entry is made, as `fetch` would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from ..pins.config import Project
from ..store import adopt as adopting
from ..store import blobs as store
from .fetch_models import fetch
from .link import model_of


@dataclass
class Report:
    name: str
    files: List[dict] = field(default_factory=list)  # per file: filename, sha256, size, state, found, skipped
    saved: int = 0  # bytes not downloaded thanks to a verified copy elsewhere

    @property
    def complete(self) -> bool:
        return all(f["state"] in ("in store", "adopted", "found") for f in self.files)

    def to_json(self) -> dict:
        return {"name": self.name, "files": self.files, "saved": self.saved, "complete": self.complete}


def scan(project: Project, names: Optional[Sequence[str]] = None, dry_run: bool = False,
         home: Optional[Path] = None) -> List[Report]:
    home = store.root(home)
    places = adopting.default_places(project.config.adopt_from)
    out = []
    for name in (names or sorted(project.lock.models)):
        entry = project.lock.models[name]
        if entry.mode != "flat":
            continue
        model = model_of(entry)
        report = Report(name)
        for f in model.files:
            row = {"filename": f.filename, "sha256": f.hash.hex, "size": f.size, "found": None, "skipped": []}
            if store.has_blob(f.hash, home, f.size):
                row["state"] = "in store"
            else:
                want = adopting.Want(f.hash, f.size, Path(f.filename).name, model.repo)
                if dry_run:
                    outcome = adopting.find(want, places, home, adopt=False)
                else:
                    outcome = adopting.adopt_blob(want, places, home)
                row["skipped"] = [s.to_json() for s in outcome.skipped]
                if outcome.found is not None:
                    row["found"] = outcome.found.to_json()
                    row["state"] = "found" if dry_run else "adopted"
                    report.saved += f.size
                else:
                    row["state"] = "missing"
            report.files.append(row)
        if not dry_run and report.complete and report.saved:
            fetch([name], offline=True, progress=False, home=home, config=project.config.path,
                  lock=project.lock.path)  # the named entry, from the store alone
        out.append(report)
    return out
