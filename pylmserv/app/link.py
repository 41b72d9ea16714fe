"""`pylmserv link`: lay locked models out where other tools look, by hard link (store/views).

`pylmserv link NAME... --layout hf|ollama|lmstudio [--to DIR]`; `--remove` undoes it.
A model must be fetched (or adopted) first: a view shows the store's own inodes.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..core.errors import UsageError
from ..pins.config import Project
from ..pins.lock import HfPin, LockEntry
from ..store import blobs as store
from ..store import views
from ..store.adopt import repo_of_url
from ..store.layout import home as store_home


def _filename(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])


def model_of(entry: LockEntry) -> views.Model:
    """A lock entry as a view sees it: files (hash, size, name in the repo), Hub repo, commit."""
    if entry.mode != "flat":
        raise UsageError(f"models.{entry.name} is an archive pin; only single GGUF files (or split sets) "
                         "can be linked")
    repo = commit = revision = None
    if isinstance(entry, HfPin):
        repo, commit, revision = entry.hf, entry.rev, entry.revision
        first = entry.file
    else:
        repo = repo_of_url(entry.url)
        parts = entry.url.split("/resolve/", 1)
        if repo and len(parts) == 2 and "/" in parts[1]:
            commit, first = parts[1].split("/", 1)
            revision = None
        else:
            first = _filename(entry.url)
    if entry.size is None:
        raise UsageError(f"models.{entry.name} has no size in the lock", hint=f"Run `pylmserv prefetch --refresh {entry.name}`.")
    directory = first.rsplit("/", 1)[0] + "/" if "/" in first else ""
    files = [views.ViewFile(first, entry.hash, entry.size)]
    for shard in getattr(entry, "shards", ()):
        files.append(views.ViewFile(directory + _filename(shard.file), shard.hash, shard.size or 0))
    if commit is not None and not (len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)):
        revision, commit = commit, None  # a branch in the URL: no commit to lay a snapshot under
    return views.Model(entry.name, tuple(files), repo, commit, revision)


def link(project: Project, names: Sequence[str], layout: str, to: Optional[Path] = None,
         home: Optional[Path] = None) -> List[views.Link]:
    home = store.root(home)
    root = Path(to).expanduser().resolve() if to else views.default_root(layout)
    out = []
    for name in names:
        entry = project.lock.models.get(name)
        if entry is None:
            raise UsageError(f"{name!r} is not a locked model",
                             hint="Known: " + ", ".join(sorted(project.lock.models)) or "the lock has no models")
        made = views.make(model_of(entry), layout, root, home)
        views.record(home, made)
        out.append(made)  # this run's: what it made, what it found there
    return out


def unlink(names: Sequence[str], layout: Optional[str] = None, to: Optional[Path] = None,
           home: Optional[Path] = None) -> List[Tuple[views.Link, List[str]]]:
    home = store.root(home)
    root = Path(to).expanduser().resolve() if to else None
    out = []
    for name in names:
        gone = views.remove(home, name, layout, root)
        if not gone:
            raise UsageError(f"{name} is not linked" + (f" with --layout {layout}" if layout else ""),
                             hint="`pylmserv list` shows what is linked.")
        out.extend(gone)
    return out


def linked(home: Optional[Path] = None) -> List[views.Link]:
    """Recorded links whose files still exist (what `list` shows)."""
    home = Path(home or store_home())
    return [l for l in views.read_links(home) if views.live(l, home)] if home.is_dir() else []
