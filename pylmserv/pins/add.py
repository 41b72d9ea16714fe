"""`pylmserv add SPEC`: a new entry in pylmserv.toml, pinned in pylmserv.lock, in one step.

  hf://ORG/REPO/PATH/FILE.gguf[@REV]   -> [models.NAME] hf, file, revision (default main)
  github:OWNER/REPO[@REF]              -> [sources.NAME] type = "github"; without REF the
                                          newest release, followed by `update` (track)
  URL (https, http, file)              -> a .gguf: [models.NAME] url; anything else:
                                          [sources.NAME] type = "url" (unpack with --unpack)

The entry is pinned first (prefetch against the edited config, in memory); only when that
succeeded are the lock and then the config written, under the project's write lock. So a
failed pin writes nothing.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import unquote, urlsplit

from ..core.errors import PylmservError, UsageError
from ..core.fsutil import atomic_write_bytes, unlink_missing_ok
from ..transfer.http import redact, refuse_credentials
from ..transfer.hub import parse_hf
from . import upstream
from .config import ARCHIVE_SUFFIXES, CONFIG_NAME, LOCK_NAME, URL_SCHEMES, check_name, packaged_dir
from . import lockfile
from .configedit import parse_config, project_lock, put_table, read_text, remove_table, write_config
from .prefetch import Change, prefetch


@dataclass(frozen=True)
class Addition:
    kind: str  # sources | models
    name: str
    table: Dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class AddResult:
    addition: Addition
    config_path: Path
    lock_path: Path
    change: Optional[Change]
    replaced: bool = False

    def to_json(self) -> dict:
        new = self.change.new.to_table() if self.change and self.change.new else None
        return {"kind": self.addition.kind, "name": self.addition.name, "config": str(self.config_path),
                "lock": str(self.lock_path), "entry": dict(self.addition.table), "pin": new,
                "replaced": self.replaced}


def derive_name(text: str) -> str:
    """A name under the one rule from a file or repo name: qwen2.5-0.5b.gguf -> qwen2_5-0_5b."""
    low = text
    for suffix in (".gguf",) + ARCHIVE_SUFFIXES:
        if low.lower().endswith(suffix):
            low = low[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9_-]", "_", low).lstrip("-_")[:64].rstrip("-") or "entry"
    return check_name(name, "derived name")


def parse_spec(spec: str, unpack: bool = False) -> Addition:
    """What SPEC asks for (no network, except `github:O/R` without a ref: its newest release)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in spec):
        raise UsageError("the spec contains control characters", hint="Pass a plain hf://, github: or URL spec.")
    if "://" in spec:  # any scheme, any case (HTTP://u:p@host): no credential is echoed or pinned
        refuse_credentials(spec, "add")
    if spec.startswith("hf://"):
        repo, path, revision = parse_hf(spec)
        if unpack:
            raise UsageError("--unpack applies to URL sources only")
        table = {"hf": repo, "file": path, "revision": revision}
        return Addition("models", derive_name(path.rsplit("/", 1)[-1]), table)
    if spec.startswith("github:"):
        body, _, ref = spec[len("github:"):].partition("@")
        parts = body.split("/")
        if len(parts) != 2 or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", p) for p in parts) or ".." in parts:
            raise UsageError(f"{redact(spec)!r}: expected github:OWNER/REPO[@REF]")
        if unpack:
            raise UsageError("--unpack applies to URL sources only")
        owner, repo = parts
        table: Dict[str, object] = {"type": "github", "owner": owner, "repo": repo}
        if ref:
            table["ref"] = ref
        else:
            latest = upstream.latest_release(owner, repo, f"github:{owner}/{repo}")
            if latest is None:
                raise UsageError(f"github:{owner}/{repo} has no published release",
                                 hint=f"Name a tag, branch or commit: github:{owner}/{repo}@REF.")
            table["ref"] = latest.name
            table["track"] = "releases"
        return Addition("sources", derive_name(repo), table)
    if spec.startswith(URL_SCHEMES):
        refuse_credentials(spec, "add")  # before anything is pinned, written or printed
        path = unquote(urlsplit(spec).path).rstrip("/")
        filename = path.rsplit("/", 1)[-1]
        if not filename:
            raise UsageError(f"{spec!r}: the URL names no file", hint="Pass --name NAME, or a URL ending in a file name.")
        if filename.lower().endswith(".gguf") and not unpack:
            return Addition("models", derive_name(filename), {"url": spec})
        table = {"type": "url", "url": spec}
        if unpack:
            table["unpack"] = True
        return Addition("sources", derive_name(filename), table)
    raise UsageError(f"unknown spec {redact(spec)!r}",
                     hint="Use hf://ORG/REPO/FILE.gguf[@REV], github:OWNER/REPO[@REF] or an https:// URL.")


def _restore(lock_path: Path, old: Optional[bytes]) -> None:
    """Put the lock back as it was before this add (gone, if it did not exist)."""
    try:
        if old is None:
            unlink_missing_ok(lock_path)
        elif not lock_path.is_file() or lock_path.read_bytes() != old:
            atomic_write_bytes(lock_path, old)
    except OSError:
        pass  # it could not be written in the first place


def add(spec: str, name: Optional[str] = None, unpack: bool = False, force: bool = False,
        config: Optional[Path] = None, lock: Optional[Path] = None, via: str = "auto") -> AddResult:
    """Add SPEC to the config (kept as the user wrote it) and pin it in the lock."""
    addition = parse_spec(spec, unpack=unpack)
    if name is not None:
        addition = Addition(addition.kind, check_name(name, "--name"), addition.table)
    config_path = Path(config) if config else Path.cwd() / CONFIG_NAME
    lock_path = Path(lock) if lock else config_path.with_name(LOCK_NAME)
    if config_path.resolve().parent == packaged_dir() or lock_path.resolve().parent == packaged_dir():
        raise UsageError("refusing to edit the packaged catalog",
                         hint="Run `pylmserv add` in your project directory (it creates pylmserv.toml there).")
    with project_lock(lock_path):
        text = read_text(config_path)
        current = parse_config(text, config_path) if text.strip() else None
        replaced = False
        if current is not None:
            other = "models" if addition.kind == "sources" else "sources"
            if addition.name in getattr(current, addition.kind) or addition.name in getattr(current, other):
                if not force:
                    raise UsageError(f"{addition.name!r} is already in {config_path}",
                                     hint="Pass --name OTHER, or --force to replace that entry.")
                replaced = True
                text = remove_table(text, other, addition.name)
        new_text = put_table(text, addition.kind, addition.name, addition.table)
        cfg = parse_config(new_text, config_path)
        old_lock = lock_path.read_bytes() if lock_path.is_file() else None
        failed = lock_path
        try:
            # Pin first: prefetch writes the lock only when every selected entry resolved.
            result = prefetch(names=[addition.name], config=cfg, lock=lock_path, via=via)
            if replaced:  # a name that moves between sources and models leaves no pin behind
                other = "models" if addition.kind == "sources" else "sources"
                lockfile.update(lock_path, lambda found: found.replace(
                    **{other: {n: e for n, e in getattr(found, other).items() if n != addition.name}}))
            failed = config_path
            write_config(config_path, new_text)
        except OSError as exc:  # both or neither: a lock pinning what the config lacks is undone
            _restore(lock_path, old_lock)
            raise PylmservError(
                f"add: cannot write {failed}: {exc.strerror or exc}; nothing was changed",
                hint=("A file bind-mounted on its own (a container) cannot be replaced by a rename: mount its "
                      "directory instead, or add the entry by hand and run `pylmserv prefetch "
                      f"{addition.name}`." if exc.errno == errno.EBUSY else
                      "Check that the project directory is writable.")) from None
    change = next((c for c in result.changes if c.name == addition.name), None)
    return AddResult(addition, config_path, lock_path, change, replaced)
