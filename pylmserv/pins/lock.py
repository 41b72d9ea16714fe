"""The lock schema: one typed record per pin kind, a version, and the upgrade of old locks.

  type = "file"     a flat file (url source without unpack, model by URL)    mode flat
  type = "archive"  an archive unpacked like fetchzip (url source, unpack)    mode nar
  type = "github"   fetchFromGitHub: archive tarball, or git with submodules  mode nar
  type = "git"      a git checkout (builtins.fetchGit / fetchgit)             mode nar
  type = "hf"       a Hugging Face Hub file (+ its split-set shards)          mode flat

LOCK_VERSION 2 is written. Version 1 (the first landing: `type = "url"` + `unpack`, models
without a type, no `git_url`/`fetcher`) is upgraded on read and rewritten by the next
prefetch; a newer version is refused. Every value written must read back identically
through Nix 2.8's builtins.fromTOML (toml11): `check_nix_value` is the one rule.
"""
from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path
from typing import ClassVar, Dict, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older Pythons only
    import tomli as tomllib

from ..core.errors import ConfigError, HashError
from ..core.fsutil import atomic_write_text, read_regular_bytes
from ..core.hashing import Hash
from ..core.names import check_name, check_version
from ..core.record import Factory, Record, field_names, hash_by_value
from ..transfer.http import refuse_credentials

LOCK_VERSION = 2
KINDS = ("sources", "models")
GIT_FETCHERS = ("builtins.fetchGit", "fetchgit")  # Nix 2.8's fetchGit drops export-ignore files; fetchgit keeps them
INT64_MAX = 2 ** 63 - 1
REGENERATE = "The lock is generated: regenerate it with `pylmserv prefetch --refresh`."

# What a TOML string may hold so that toml11 (Nix 2.8's fromTOML) reads it back unchanged
# and Nix can use it in a derivation: no NUL (Nix strings are C strings), no other C0/DEL
# control characters (terminals, URLs), valid Unicode (no lone surrogates).
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_URL_BAD = re.compile(r"[^\x21-\x7e]|[\"<>\\^`{|}]")  # printable ASCII, minus what RFC 3986 never allows


def check_nix_value(value, where: str, url: bool = False) -> None:
    """Refuse a value Nix 2.8's builtins.fromTOML would not read back identically."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ConfigError(f"{where}: {value} does not fit a 64-bit integer (Nix reads no larger)",
                              hint="Fix that number.")
        return
    if isinstance(value, str):
        bad = _BAD_CHARS.search(value)
        if bad:
            raise ConfigError(f"{where}: contains the control character U+{ord(bad.group()):04X}",
                              hint="Remove it: Nix cannot carry it through the lock.")
        if url:
            refuse_credentials(value, where)
        bad_url = _URL_BAD.search(value) if url else None
        if bad_url:
            raise ConfigError(f"{where}: {value!r} is not a URL Nix can fetch (it holds {bad_url.group()!r})",
                              hint="Percent-encode spaces, quotes, brackets and non-ASCII characters in the URL.")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_nix_value(item, f"{where}[{i}]", url=url)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            check_nix_value(k, where)
            check_nix_value(v, f"{where}.{k}", url=url and k == "url")  # (a table's url key only)
        return
    if isinstance(value, (datetime.date, datetime.time)):
        raise ConfigError(f"{where}: a TOML {type(value).__name__} cannot go into the lock (Nix 2.8 reads no "
                          "TOML dates or times)", hint="Quote it: a string.")
    raise ConfigError(f"{where}: a {type(value).__name__} cannot go into the lock",
                      hint="Use a string (or an integer where a number is meant).")


class Shard(Record):
    """Another file of a GGUF split set, pinned with the first one."""

    __slots__ = ("file", "url", "hash", "size")
    _defaults = {"size": None}
    file: str
    url: str
    hash: Hash
    size: Optional[int]

    __hash__ = hash_by_value  # hashable values only, as the frozen dataclass was

    def to_table(self) -> dict:
        t = {"file": self.file, "hash": self.hash.sri, "url": self.url}
        if self.size is not None:
            t["size"] = self.size
        return t


class _LegacyCall(type):
    """`LockEntry(kind, name, url, hash, mode, rev=, size=, extra={...})`, the first
    landing's constructor, still builds the typed pin that its keys describe."""

    def __call__(cls, *args, **kwargs):
        if cls is LockEntry:
            return _from_legacy_args(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class LockEntry(Record, metaclass=_LegacyCall):
    """What every pin has. Use one of the typed kinds below."""

    __slots__ = ("kind", "name", "url", "hash", "mode", "rev", "size")
    _defaults = {"rev": None, "size": None}
    kind: str  # "sources" | "models"
    name: str
    url: str
    hash: Hash
    mode: str  # flat | nar
    rev: Optional[str]
    size: Optional[int]

    TYPE: ClassVar[str] = ""
    MODE: ClassVar[str] = ""

    __hash__ = hash_by_value  # hashable values only, as the frozen dataclass was

    @property
    def type(self) -> str:
        return self.TYPE

    def to_table(self) -> dict:
        table = {"type": self.TYPE, "url": self.url, "hash": self.hash.sri, "mode": self.mode}
        if self.rev is not None:
            table["rev"] = self.rev
        if self.size is not None:
            table["size"] = self.size
        for name in field_names(self):
            if name in _COMMON:
                continue
            value = getattr(self, name)
            if value is None or value == ():
                continue
            table[name] = [s.to_table() for s in value] if name == "shards" else value
        return {k: table[k] for k in sorted(table)}

    @property
    def extra(self) -> Dict[str, object]:
        """The kind-specific keys as a dict (read-only view, for older callers)."""
        t = self.to_table()
        return {k: v for k, v in t.items() if k not in ("url", "hash", "mode", "rev", "size")}

    def get(self, key: str, default=None):
        return self.extra.get(key, default)

    def check(self) -> None:
        """Every value readable by Nix 2.8 and sane for its kind (raises ConfigError)."""
        where = f"[{self.kind}.{self.name}]"
        if self.mode != self.MODE:
            raise ConfigError(f"{where}: a {self.TYPE} pin has mode {self.MODE!r}, not {self.mode!r}", hint=REGENERATE)
        if self.size is not None and self.size < 0:
            raise ConfigError(f"{where}: negative size {self.size}", hint=REGENERATE)
        for key, value in self.to_table().items():
            check_nix_value(value, f"{where} {key}", url=key in ("url", "git_url", "shards"))
        for key in ("version", "cosmocc"):
            if getattr(self, key, None) is not None:
                check_version(getattr(self, key), f"{where} {key}")
        fetcher = getattr(self, "fetcher", None)
        if fetcher is not None and fetcher not in self.fetchers():
            raise ConfigError(f"{where}: unknown fetcher {fetcher!r} for this pin",
                              hint="Use " + " or ".join(self.fetchers()) + ". " + REGENERATE)

    def fetchers(self) -> Tuple[str, ...]:
        """The Nix fetchers this pin's hash may be for (nix/sources.nix agrees)."""
        return ()


_COMMON = {"kind", "name", "url", "hash", "mode", "rev", "size"}


class FilePin(LockEntry):
    """A flat file by URL (`fetchurl`): a url source without unpack, or a model by URL."""

    __slots__ = ("version", "cosmocc", "shards", "fetcher")
    _defaults = {"mode": "flat", "version": None, "cosmocc": None, "shards": (), "fetcher": None}
    version: Optional[str]
    cosmocc: Optional[str]
    shards: Tuple[Shard, ...]
    fetcher: Optional[str]

    TYPE: ClassVar[str] = "file"
    MODE: ClassVar[str] = "flat"

    def fetchers(self) -> Tuple[str, ...]:
        return ("fetchurl",)


class ArchivePin(LockEntry):
    """An archive by URL, NAR hash of the tree unpacked like `fetchzip`."""

    __slots__ = ("version", "cosmocc", "fetcher")
    _defaults = {"mode": "nar", "version": None, "cosmocc": None, "fetcher": None}
    version: Optional[str]
    cosmocc: Optional[str]
    fetcher: Optional[str]

    TYPE: ClassVar[str] = "archive"
    MODE: ClassVar[str] = "nar"

    def fetchers(self) -> Tuple[str, ...]:
        return ("fetchzip",)


class GitPin(LockEntry):
    """A git checkout at `rev`; `fetcher` says which Nix fetcher the NAR hash is for."""

    __slots__ = ("ref", "git_url", "submodules", "fetcher", "version", "cosmocc")
    _defaults = {"mode": "nar", "ref": None, "git_url": None, "submodules": False, "fetcher": "builtins.fetchGit",
                 "version": None, "cosmocc": None}
    ref: Optional[str]
    git_url: Optional[str]
    submodules: bool
    fetcher: str
    version: Optional[str]
    cosmocc: Optional[str]

    TYPE: ClassVar[str] = "git"
    MODE: ClassVar[str] = "nar"

    def fetchers(self) -> Tuple[str, ...]:
        return GIT_FETCHERS


class GithubPin(LockEntry):
    """fetchFromGitHub: the archive tarball (url), or a git checkout when `submodules`."""

    __slots__ = ("owner", "repo", "ref", "git_url", "submodules", "fetcher", "version", "cosmocc")
    _defaults = {"mode": "nar", "owner": "", "repo": "", "ref": None, "git_url": None, "submodules": False,
                 "fetcher": None, "version": None, "cosmocc": None}
    owner: str
    repo: str
    ref: Optional[str]
    git_url: Optional[str]
    submodules: bool
    fetcher: Optional[str]  # only when fetched with git (submodules)
    version: Optional[str]
    cosmocc: Optional[str]

    TYPE: ClassVar[str] = "github"
    MODE: ClassVar[str] = "nar"

    def fetchers(self) -> Tuple[str, ...]:
        return GIT_FETCHERS + ("fetchFromGitHub",) if self.submodules else ("fetchzip", "fetchFromGitHub")


class HfPin(LockEntry):
    """A file on the Hugging Face Hub at commit `rev` (+ the rest of its split set)."""

    __slots__ = ("hf", "file", "revision", "shards", "fetcher")
    _defaults = {"mode": "flat", "hf": "", "file": "", "revision": None, "shards": (), "fetcher": None}
    hf: str
    file: str
    revision: Optional[str]  # as asked in the config (rev: the commit it resolved to)
    shards: Tuple[Shard, ...]
    fetcher: Optional[str]

    def fetchers(self) -> Tuple[str, ...]:
        return ("fetchurl",)

    TYPE: ClassVar[str] = "hf"
    MODE: ClassVar[str] = "flat"


PIN_TYPES = {cls.TYPE: cls for cls in (FilePin, ArchivePin, GitPin, GithubPin, HfPin)}


# -- reading ---------------------------------------------------------------------------

def pin_from_table(kind: str, name: str, table: dict, where: str = "pylmserv.lock") -> LockEntry:
    """A version-2 table -> its typed pin (unknown keys, wrong types: ConfigError)."""
    check_name(name, f"{where}: [{kind}]")
    w = f"{where}: [{kind}.{name}]"
    t = dict(table)
    ptype = t.pop("type", None)
    cls = PIN_TYPES.get(ptype) if isinstance(ptype, str) else None
    if cls is None:
        raise ConfigError(f"{w}: unknown pin type {ptype!r}", hint="Known: " + ", ".join(PIN_TYPES) + ". " + REGENERATE)
    allowed = [name for name in field_names(cls) if name not in ("kind", "name")]
    unknown = sorted(set(t) - set(allowed))
    if unknown:
        raise ConfigError(f"{w}: unknown key(s) {', '.join(unknown)} for a {ptype} pin", hint=REGENERATE)
    for key in ("url", "hash", "mode"):
        if key not in t:
            raise ConfigError(f"{w}: missing field '{key}'", hint=REGENERATE)
    values = {}
    for key, value in t.items():
        if key == "hash":
            values[key] = _hash(value, w, key)
        elif key == "shards":
            values[key] = _shards(value, w)
        elif key in ("size",):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{w}: field 'size' must be a non-negative integer", hint=REGENERATE)
            values[key] = value
        elif key == "submodules":
            if not isinstance(value, bool):
                raise ConfigError(f"{w}: field 'submodules' must be true or false", hint=REGENERATE)
            values[key] = value
        else:
            if not isinstance(value, str) or (key in ("url", "mode") and not value.strip()):
                raise ConfigError(f"{w}: field '{key}' must be a non-empty string", hint=REGENERATE)
            values[key] = value
    if values["mode"] not in ("flat", "nar"):
        raise ConfigError(f"{w}: mode must be 'flat' or 'nar', got {values['mode']!r}", hint=REGENERATE)
    pin = cls(kind=kind, name=name, **values)
    try:
        pin.check()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
    return pin


def _hash(value, where: str, key: str) -> Hash:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field '{key}' must be a string", hint=REGENERATE)
    try:
        return Hash.parse(value)
    except HashError as exc:
        raise ConfigError(f"{where}: bad {key}: {exc.message}", hint=REGENERATE) from None


def _shards(value, where: str) -> Tuple[Shard, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: malformed shards list", hint=REGENERATE)
    out = []
    for item in value:
        if (not isinstance(item, dict) or set(item) - {"file", "url", "hash", "size"}
                or not isinstance(item.get("file"), str) or not isinstance(item.get("url"), str)
                or not (item.get("size") is None or (isinstance(item["size"], int) and not isinstance(item["size"], bool)))):
            raise ConfigError(f"{where}: malformed shards list", hint=REGENERATE)
        out.append(Shard(item["file"], item["url"], _hash(item.get("hash"), where, "shards.hash"), item.get("size")))
    return tuple(out)


def upgrade_v1(kind: str, name: str, table: dict, where: str = "pylmserv.lock") -> dict:
    """A version-1 table (the first landing) -> the version-2 table for the same pin."""
    t = dict(table)
    old = t.pop("type", None)
    if kind == "models":
        if old is not None:  # v1 models had no type: refuse rather than guess
            raise ConfigError(f"{where}: [{kind}.{name}]: unexpected type {old!r}", hint=REGENERATE)
        t["type"] = "hf" if "hf" in t else "file"
    elif old == "url":
        t["type"] = "archive" if t.pop("unpack", False) else "file"
    elif old == "github":
        owner, repo = t.get("owner"), t.get("repo")
        if isinstance(owner, str) and isinstance(repo, str):
            t.setdefault("git_url", f"https://github.com/{owner}/{repo}.git")
        if t.get("submodules"):
            t.setdefault("fetcher", "builtins.fetchGit")  # what v1's python and fod backends hashed
        t["type"] = "github"
    elif old == "git":
        t["type"] = "git"
        t.setdefault("git_url", t.get("url"))
        t.setdefault("fetcher", "builtins.fetchGit")
    elif old is None:  # v1 read a typeless source as a download (unpacked when mode = nar)
        t["type"] = "archive" if t.get("mode") == "nar" else "file"
    else:
        t["type"] = old
    t.pop("description", None)
    return t


UPGRADES = {1: upgrade_v1}  # version N -> N+1, applied in order


def parse_lock_data(data: dict, where: str) -> Tuple[int, Dict[str, Dict[str, LockEntry]]]:
    """(version as read, {kind: {name: pin}}), older versions upgraded, newer refused."""
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{where}: no valid lock version ({version!r})", hint=REGENERATE)
    if version > LOCK_VERSION:
        raise ConfigError(f"{where}: unsupported lock version {version}: written by a newer pylmserv "
                          f"(this one reads versions 1 to {LOCK_VERSION})",
                          hint="Upgrade pylmserv (or regenerate the lock with this one: `pylmserv prefetch --refresh`).")
    unknown = sorted(set(data) - {"version", *KINDS})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", hint="Allowed: models, sources, version")
    out: Dict[str, Dict[str, LockEntry]] = {}
    for kind in KINDS:
        tables = data.get(kind, {})
        if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
            raise ConfigError(f"{where}: [{kind}] must be a table of tables, e.g. [{kind}.NAME]", hint=REGENERATE)
        pins = {}
        for name, table in tables.items():
            for v in range(version, LOCK_VERSION):
                table = UPGRADES[v](kind, name, table, where)
            pins[name] = pin_from_table(kind, name, table, where)
        out[kind] = pins
    return version, out


def _from_legacy_args(kind, name, url, hash, mode, rev=None, size=None, extra=None) -> LockEntry:
    table = {**(extra or {}), "url": url, "hash": hash.sri, "mode": mode}
    if rev is not None:
        table["rev"] = rev
    if size is not None:
        table["size"] = size
    if table.get("type") not in ("file", "archive", "hf"):  # a version-1 shape (git/github: both)
        if kind == "sources" and "type" not in table:
            table.update(type="url", unpack=table.get("unpack", mode == "nar"))
        table = upgrade_v1(kind, name, table)
    return pin_from_table(kind, name, table, "LockEntry")


# -- the whole lock --------------------------------------------------------------------

class Lock(Record):
    __slots__ = ("path", "sources", "models", "version")
    _defaults = {"sources": Factory(dict), "models": Factory(dict), "version": LOCK_VERSION}
    path: Optional[Path]
    sources: Dict[str, LockEntry]
    models: Dict[str, LockEntry]
    version: int  # as read (an upgraded lock says 1 until it is written)

    def entry(self, kind: str, name: str) -> Optional[LockEntry]:
        return getattr(self, kind).get(name)

    def with_entry(self, entry: LockEntry) -> "Lock":
        table = dict(getattr(self, entry.kind))
        table[entry.name] = entry
        return self.replace(**{entry.kind: table})

    def without(self, kind: str, name: str) -> "Lock":
        return self.replace(**{kind: {n: e for n, e in getattr(self, kind).items() if n != name}})

    @property
    def needs_upgrade(self) -> bool:
        return self.version != LOCK_VERSION

    def to_toml(self) -> str:
        import tomli_w

        doc: dict = {"version": LOCK_VERSION}
        for kind in KINDS:
            items = getattr(self, kind)
            if items:
                doc[kind] = {}
                for name in sorted(items):
                    items[name].check()
                    doc[kind][name] = items[name].to_table()
        header = "# Generated by `pylmserv prefetch`; read by pylmserv and flake.nix. Do not edit hashes by hand.\n"
        return header + tomli_w.dumps(doc)

    def write(self, path: Optional[Path] = None) -> Path:
        """Write atomically: a failed or killed write leaves the old lock in place.
        (Read-merge-write under the file lock: pylmserv.pins.lockfile.)"""
        target = Path(path or self.path)
        text = self.to_toml()
        tomllib.loads(text)  # never write what we cannot read back
        atomic_write_text(target, text)
        return target


PROJECT_FILE_LIMIT = 64 << 20  # bytes: a config or lock is kilobytes; a catalog of thousands, a few MiB


def read_project_file(path: Path) -> bytes:
    """A config or lock file's bytes (a link is the user's choice and followed), but never a
    FIFO or device (a read that blocks or never ends) nor a file over PROJECT_FILE_LIMIT:
    those are one ConfigError. Missing and other OS errors are the caller's."""
    import errno

    try:
        return read_regular_bytes(path, PROJECT_FILE_LIMIT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ConfigError(f"{path}: not a regular file (a FIFO, a socket or a device)",
                              hint="Point --config/--lock at the project's files.") from None
        if exc.errno == errno.EFBIG:
            raise ConfigError(f"{path}: larger than {PROJECT_FILE_LIMIT >> 20} MiB; no config or lock is that big",
                              hint="Point --config/--lock at the project's files.") from None
        raise


def read_lock_text(path: Path) -> dict:
    try:
        text = read_project_file(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", hint=REGENERATE) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}",
                          hint="The lock is generated: restore it from version control or regenerate it with "
                               "`pylmserv prefetch --refresh`.") from None


def load_lock(path: Path, missing_ok: bool = True) -> Lock:
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return Lock(path=path)
        raise ConfigError(f"lock not found: {path}", hint="Run `pylmserv prefetch` to create it.")
    data = read_lock_text(path)
    version, pins = parse_lock_data(data, str(path))
    return Lock(path=path, sources=pins["sources"], models=pins["models"], version=version)
