"""Format-preserving edits of pylmserv.toml (`add`, `update`), and the project write lock.

The user's comments, order and layout stay: values are changed in place with tomlkit; a
new entry is appended as its own `[kind.NAME]` table at the end of the file; a replaced
entry (`add --force`) is swapped line-for-line where it stood. Every edited text is parsed
back through the config loader before anyone writes it.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional

from ..core.errors import ConfigError, PylmservError
from ..core.flock import FileLock, LockTimeout
from ..core.fsutil import atomic_write_text
from .config import Config, load_config

LOCK_WAIT = 600  # seconds to wait for another pylmserv writing the same project


def _tomlkit():
    import tomlkit  # lazy: only the commands that edit the config pay for it

    return tomlkit


def table_text(kind: str, name: str, table: Dict[str, object]) -> str:
    """`[kind.name]` and its keys, as tomlkit writes them."""
    return _tomlkit().dumps({kind: {name: table}})


def _header_re(kind: str, name: str) -> re.Pattern:
    quoted = f'(?:{re.escape(name)}|"{re.escape(name)}"|\'{re.escape(name)}\')'
    return re.compile(rf"^\s*\[\s*{kind}\s*\.\s*{quoted}\s*\]\s*(#.*)?$")


def put_table(text: str, kind: str, name: str, table: Dict[str, object]) -> str:
    """`text` with `[kind.name]` set to `table`: replaced in place if present, else appended."""
    lines = text.splitlines(keepends=True)
    header = _header_re(kind, name)
    start = next((i for i, ln in enumerate(lines) if header.match(ln)), None)
    new = table_text(kind, name, table)
    if start is None:
        if not text.strip():
            return new
        return text.rstrip("\n") + "\n\n" + new
    end = start + 1
    while end < len(lines) and not re.match(r"^\s*\[", lines[end]):
        end += 1
    # Blank and comment lines just before the next table belong to that table.
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    return "".join(lines[:start]) + new + "".join(lines[end:])


def remove_table(text: str, kind: str, name: str) -> str:
    """`text` without `[kind.name]` (used when `add --force` moves a name to another kind)."""
    lines = text.splitlines(keepends=True)
    header = _header_re(kind, name)
    start = next((i for i, ln in enumerate(lines) if header.match(ln)), None)
    if start is None:
        return text
    end = start + 1
    while end < len(lines) and not re.match(r"^\s*\[", lines[end]):
        end += 1
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    return "".join(lines[:start] + lines[end:])


def set_values(text: str, kind: str, name: str, values: Dict[str, object]) -> str:
    """`text` with keys of `[kind.name]` set in place (comments and layout kept)."""
    tomlkit = _tomlkit()
    doc = tomlkit.parse(text)
    try:
        table = doc[kind][name]
    except KeyError:
        raise ConfigError(f"[{kind}.{name}] is not in the config") from None
    for key, value in values.items():
        table[key] = value
    return tomlkit.dumps(doc)


def parse_config(text: str, path: Path) -> Config:
    """Load `text` as if it were the config at `path` (validated by the one loader)."""
    path = Path(path)
    directory = path.parent if path.parent.is_dir() else Path(tempfile.gettempdir())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        cfg = load_config(Path(tmp))
    except PylmservError as exc:
        raise ConfigError(exc.message.replace(tmp, str(path)), hint=exc.hint) from None
    finally:
        os.unlink(tmp)
    return cfg.replace(path=path)


def write_config(path: Path, text: str) -> None:
    atomic_write_text(path, text)


@contextlib.contextmanager
def project_lock(lock_path: Path) -> Iterator[None]:
    """One writer per project (config + lock) at a time, across processes: an flock on a
    hidden file beside the lock (dies with its holder, so never stale)."""
    lock_path = Path(lock_path)
    guard = FileLock(lock_path.with_name(f".{lock_path.name}.flock"))
    try:
        guard.acquire(timeout=LOCK_WAIT)
    except LockTimeout:
        raise PylmservError(f"another pylmserv has been writing {lock_path} for {LOCK_WAIT}s",
                            hint="Wait for it to finish, then rerun.") from None
    try:
        yield
    finally:
        guard.release()


def read_text(path: Optional[Path]) -> str:
    if path is None or not Path(path).exists():
        return ""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text", hint="Fix the file's encoding.") from None
