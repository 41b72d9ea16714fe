"""`pylmserv update`: move pins to what upstream offers now, as the config's `track` says.

  github  track = "releases"  newest published release (tag-pattern filters and orders)
          track = "tags"      newest tag (GitHub API)
          track = "branch"    head of `ref` (the config keeps the branch, the lock moves)
  git     track = "tags"      newest tag from `git ls-remote --tags`; "branch" as above
  url     track = "releases"  a github.com release-download URL moves to the newest release
                              (its tag and `version` replaced in the URL), e.g. cosmocc
  hf      revision is a branch: follows its head (lock only); revision is a commit and
          track = "branch": follows `branch` (default main), revision rewritten
Anything else has nothing to follow and is left alone (and said so).

Every entry is planned first (network only, nothing written). Then each update is applied
on its own under the project's write lock: config edited in place, `prefetch` pins the new
state (the lock is written only when pinning succeeded), then the config is written. A tag
whose commit changed since it was locked (a retagged release) stops the update: pylmserv
never moves a pin silently.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

from ..core.errors import PylmservError, RetaggedError, ToolMissingError, UsageError
from ..core.log import get_logger
from ..store.trees import mirror_url
from ..transfer import hub
from . import upstream
from .config import LOCK_NAME, Config, LockEntry, ModelSpec, SourceSpec, default_config_path, load_config, load_lock
from .configedit import parse_config, project_lock, read_text, set_values, write_config
from .prefetch import prefetch
from ..transfer.git import resolve_ref

log = get_logger("pylmserv.update")

EXIT_UPDATED = 10  # `update` exit status when something was (or, with --dry-run, would be) updated
_SHA = re.compile(r"^[0-9a-f]{40}$")
_RELEASE_URL = re.compile(r"^https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)/releases/download/([^/]+)/([^/?#]+)$")


@dataclass(frozen=True)
class Version:
    ref: Optional[str] = None
    commit: Optional[str] = None
    date: Optional[str] = None
    size: Optional[int] = None

    def to_json(self) -> dict:
        return {"ref": self.ref, "commit": self.commit, "date": self.date, "size": self.size}


@dataclass
class Entry:
    kind: str
    name: str
    status: str  # update | current | not-followed  (then: updated | would-update)
    old: Version
    new: Optional[Version] = None
    config_values: Dict[str, object] = field(default_factory=dict)
    reason: str = ""
    commit_sha: Optional[str] = None  # --commit

    @property
    def changed(self) -> bool:
        return self.status in ("update", "updated", "would-update")

    def label(self, v: Version) -> str:
        moved_ref = self.new is not None and self.old.ref != self.new.ref
        if moved_ref or not v.commit:
            return str(v.ref or (v.commit or "-")[:12])
        return v.commit[:12]

    def describe(self) -> str:
        head = f"{self.kind}.{self.name}"
        if self.status == "not-followed":
            return f"{head}: left alone ({self.reason})"
        if self.status == "current":
            pin = [str(x) for x in (self.old.ref, (self.old.commit or "")[:12]) if x]
            return f"{head}: up to date ({', '.join(dict.fromkeys(pin)) or '-'})"
        new = self.new or Version()
        parts = [f"{head}: {self.label(self.old)} -> {self.label(new)}"]
        if self.old.commit != new.commit and (self.old.ref != new.ref) and (self.old.commit or new.commit):
            parts.append(f"commit {(self.old.commit or '?')[:12]} -> {(new.commit or '?')[:12]}")
        if self.old.date or new.date:
            parts.append(f"date {_day(self.old.date)} -> {_day(new.date)}")
        if self.old.size is not None or new.size is not None:
            parts.append(f"size {_size(self.old.size)} -> {_size(new.size)}")
        if self.status == "would-update":
            parts.append("dry run")
        return parts[0] + (" (" + ", ".join(parts[1:]) + ")" if len(parts) > 1 else "")

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "status": self.status, "old": self.old.to_json(),
                "new": self.new.to_json() if self.new else None, "config": dict(self.config_values),
                "reason": self.reason, "git_commit": self.commit_sha}


@dataclass
class UpdateResult:
    entries: List[Entry]
    dry_run: bool
    config_path: Optional[Path]
    lock_path: Optional[Path]

    @property
    def changed(self) -> List[Entry]:
        return [e for e in self.entries if e.changed]

    @property
    def exit_code(self) -> int:
        return EXIT_UPDATED if self.changed else 0

    def to_json(self) -> dict:
        return {"config": str(self.config_path) if self.config_path else None,
                "lock": str(self.lock_path) if self.lock_path else None, "dry_run": self.dry_run,
                "changed": len(self.changed), "exit_code": self.exit_code,
                "entries": [e.to_json() for e in self.entries]}


def _day(date: Optional[str]) -> str:
    return date[:10] if date else "?"


def _size(size: Optional[int]) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "?"


# -- planning (network, nothing written) -------------------------------------------------------

def plan_source(spec: SourceSpec, locked: Optional[LockEntry]) -> Entry:
    track = spec.follow.get("track")
    pattern = spec.follow.get("tag-pattern")
    old = Version(ref=spec.ref if spec.type != "url" else spec.meta.get("version") or spec.url,
                  commit=locked.rev if locked else None, size=locked.size if locked else None)
    entry = Entry("sources", spec.name, "current", old)
    what = f"sources.{spec.name}"
    if not track:
        entry.status, entry.reason = "not-followed", "no `track` key"
        return entry
    if spec.type == "url":
        return _plan_url(spec, entry, track, pattern, what)
    git_url = mirror_url(spec.git_url)
    if track == "releases" and spec.type != "github":
        raise UsageError(f"{what}: track = \"releases\" needs a github source",
                         hint="Use track = \"tags\" for a git source.")
    if track == "branch":
        head = resolve_ref(git_url, spec.ref)
        if locked is not None and locked.rev == head:
            return entry
        date = upstream.commit(spec.owner, spec.repo, head, what).date if spec.type == "github" else None
        entry.status, entry.new = "update", Version(spec.ref, head, date, None)
        return entry
    # releases / tags: a newer tag moves `ref`; the current tag must still name the locked commit.
    _check_not_retagged(spec, locked, git_url, what)
    if spec.type == "github":
        found = (upstream.releases if track == "releases" else upstream.tags)(spec.owner, spec.repo, what)
    else:
        found = upstream.git_tags(git_url)
    best = upstream.newest(found, pattern)
    if best is None:
        raise UsageError(f"{what}: no upstream {track} match" + (f" tag-pattern {pattern!r}" if pattern else ""),
                         hint="Check tag-pattern in pylmserv.toml (it must match the whole tag name).")
    if best.name == spec.ref:
        return entry
    current = upstream.newest([t for t in found if t.name == spec.ref] + [best], pattern)
    if current is not None and current.name != best.name:  # the locked tag sorts after "newest"
        return entry
    commit = resolve_ref(git_url, best.name)
    date = best.date
    if spec.type == "github" and date is None:
        date = upstream.commit(spec.owner, spec.repo, commit, what).date
    if spec.type == "github" and locked is not None and locked.rev and _SHA.match(locked.rev):
        old = Version(old.ref, old.commit, upstream.commit(spec.owner, spec.repo, locked.rev, what).date, old.size)
        entry.old = old
    entry.status, entry.new = "update", Version(best.name, commit, date, None)
    entry.config_values = {"ref": best.name}
    return entry


def _check_not_retagged(spec: SourceSpec, locked: Optional[LockEntry], git_url: str, what: str) -> None:
    if locked is None or not locked.rev or not _SHA.match(locked.rev) or _SHA.match(spec.ref or ""):
        return
    if locked.get("ref") not in (None, spec.ref):
        return  # the config moved since the lock was written; prefetch owns that change
    now = resolve_ref(git_url, spec.ref)
    if now != locked.rev:
        raise RetaggedError(f"{what}: tag {spec.ref!r} now points at {now[:12]}, but the lock pins {locked.rev[:12]}: "
                            "upstream moved (retagged) it; pylmserv does not move a pin silently",
                            hint=f"Check upstream's reason; if the new commit is wanted, run "
                                 f"`pylmserv prefetch --refresh {spec.name}`, then `pylmserv update` again.")


def _plan_url(spec: SourceSpec, entry: Entry, track: str, pattern: Optional[str], what: str) -> Entry:
    m = _RELEASE_URL.match(spec.url or "")
    if track != "releases" or m is None:
        raise UsageError(f"{what}: a url source can only follow GitHub releases "
                         "(track = \"releases\" and a https://github.com/O/R/releases/download/TAG/FILE url)")
    owner, repo, tag, filename = m.groups()
    found = [t for t in upstream.releases(owner, repo, what) if "/" not in t.name]  # a tag is one URL segment
    best = upstream.newest(found, pattern)
    if best is None or best.name == tag:
        return entry
    current = upstream.newest([t for t in found if t.name == tag] + [best], pattern)
    if current is not None and current.name != best.name:
        return entry
    old_version = str(spec.meta.get("version") or _version_of(tag, pattern))
    new_version = _version_of(best.name, pattern)
    if old_version not in filename:
        raise UsageError(f"{what}: cannot tell where the version is in {filename!r}",
                         hint="Add version = \"X\" (as it appears in the file name) to the entry.")
    url = f"https://github.com/{owner}/{repo}/releases/download/{best.name}/{filename.replace(old_version, new_version)}"
    entry.status = "update"
    entry.old = Version(old_version, None, next((t.date for t in found if t.name == tag), None), entry.old.size)
    entry.new = Version(new_version, None, best.date, None)
    entry.config_values = {"url": url}
    if "version" in spec.meta:
        entry.config_values["version"] = new_version
    return entry


def _version_of(tag: str, pattern: Optional[str]) -> str:
    if pattern:
        m = re.fullmatch(pattern, tag)
        if m and m.groups() and m.group(1):
            return m.group(1)
    return tag[1:] if re.match(r"v\d", tag) else tag


def plan_model(spec: ModelSpec, locked: Optional[LockEntry]) -> Entry:
    old = Version(spec.revision if spec.hf else None, locked.rev if locked else None, None,
                  locked.size if locked else spec.size)
    entry = Entry("models", spec.name, "current", old)
    what = f"models.{spec.name}"
    if not spec.hf:
        entry.status, entry.reason = "not-followed", "a URL model: nothing upstream to follow"
        return entry
    pinned = _SHA.match(spec.revision or "")
    if pinned and spec.follow.get("track") != "branch":
        entry.status, entry.reason = "not-followed", "revision is a commit (set track = \"branch\" to follow main)"
        return entry
    branch = spec.follow.get("branch", "main") if pinned else spec.revision
    head, date = _hub_head(spec.hf, branch, what)
    if head == (spec.revision if pinned else (locked.rev if locked else None)):
        return entry
    info = hub.file_info(spec.hf, head, [spec.file], what) or {}
    item = info.get(spec.file) or {}
    size = (item.get("lfs") or {}).get("size", item.get("size"))
    entry.status = "update"
    entry.new = Version(head if pinned else spec.revision, head, date, int(size) if isinstance(size, int) else None)
    if pinned:
        entry.config_values = {"revision": head}
        entry.old = Version(spec.revision, old.commit, None, old.size)
    return entry


def _hub_head(repo: str, branch: str, what: str):
    data = hub.api_json("GET", f"/api/models/{repo}/revision/{branch}", what)
    sha = data.get("sha") if isinstance(data, dict) else None
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise PylmservError(f"{what}: the Hub did not resolve {branch!r} of {repo}")
    date = data.get("lastModified") if isinstance(data.get("lastModified"), str) else None
    return sha, date


# -- applying ---------------------------------------------------------------------------------

def update(names: Optional[Iterable[str]] = None, config: Union[Path, str, None] = None,
           lock: Union[Path, str, None] = None, dry_run: bool = False, commit: bool = False,
           via: str = "auto") -> UpdateResult:
    """Plan every selected entry, then (unless dry_run) apply each update on its own."""
    config_path = Path(config) if config else default_config_path()
    lock_path = Path(lock) if lock else config_path.with_name(LOCK_NAME)
    cfg: Config = load_config(config_path)
    current = load_lock(lock_path)
    selected = _select(cfg, names)
    repo_root = _git_root(config_path) if commit and not dry_run else None
    entries = []
    for kind, spec in selected:
        locked = current.entry(kind, spec.name)
        entries.append(plan_source(spec, locked) if kind == "sources" else plan_model(spec, locked))
    result = UpdateResult(entries, dry_run, config_path, lock_path)
    for entry in entries:
        if not entry.changed:
            continue
        if dry_run:
            entry.status = "would-update"
            continue
        _apply(entry, config_path, lock_path, via)
        entry.status = "updated"
        if repo_root is not None:
            entry.commit_sha = _git_commit(repo_root, [config_path, lock_path],
                                           f"{entry.name}: {entry.label(entry.old)} -> {entry.label(entry.new)}")
    return result


def _select(cfg: Config, names: Optional[Iterable[str]]) -> list:
    everything = [("sources", s) for s in cfg.sources.values()] + [("models", m) for m in cfg.models.values()]
    if not names:
        return everything
    known = {spec.name: (kind, spec) for kind, spec in everything}
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown name(s): {', '.join(unknown)}", hint="Known: " + ", ".join(sorted(known)))
    return [known[n] for n in names]


def _apply(entry: Entry, config_path: Path, lock_path: Path, via: str) -> None:
    with project_lock(lock_path):
        text = read_text(config_path)
        new_text = set_values(text, entry.kind, entry.name, entry.config_values) if entry.config_values else text
        cfg = parse_config(new_text, config_path)
        result = prefetch(names=[entry.name], config=cfg, lock=lock_path, via=via)  # writes the lock or nothing
        if new_text != text:
            write_config(config_path, new_text)
    pinned = next((c.new for c in result.changes if c.name == entry.name and c.new is not None), None)
    if pinned is not None and entry.new is not None:
        entry.new = Version(entry.new.ref, pinned.rev or entry.new.commit, entry.new.date,
                            pinned.size if pinned.size is not None else entry.new.size)


def _git(root: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ToolMissingError("git is not on PATH", hint="Install git, or run update without --commit.") from None
    if proc.returncode != 0:
        raise PylmservError(f"git {args[0]} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}",
                            hint="Fix the repository state (see git's message) and commit by hand.")
    return proc.stdout.strip()


def _git_root(config_path: Path) -> Path:
    directory = config_path.resolve().parent
    try:
        proc = subprocess.run(["git", "-C", str(directory), "rev-parse", "--show-toplevel"],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ToolMissingError("git is not on PATH", hint="Install git, or run update without --commit.") from None
    if proc.returncode != 0:
        raise UsageError(f"--commit: {directory} is not in a git repository",
                         hint="Run `git init` there, or update without --commit.")
    return Path(proc.stdout.strip())


def _git_commit(root: Path, paths: List[Path], message: str) -> str:
    rel = [str(p.resolve()) for p in paths if p.exists()]
    _git(root, "add", "--", *rel)
    _git(root, "commit", "-q", "-m", message, "--", *rel)  # only these files, whatever else is staged
    return _git(root, "rev-parse", "HEAD")
