"""Load and validate pylmserv.toml (intent); the project = config + lock (pylmserv.pins.lock).

Everything a config value can carry into the lock is checked here, once: names follow
core.names' rule, values must read back through Nix 2.8's builtins.fromTOML (lock.check_nix_value).
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older Pythons only
    import tomli as tomllib

from ..core.errors import ConfigError, HashError, UsageError
from ..core.hashing import Hash
from ..core.names import check_name, check_version, show
from ..core.record import Factory, Record
from .lock import LOCK_VERSION, Lock, LockEntry, check_nix_value, load_lock, read_project_file  # noqa: F401 (re-exported)
from ..store.roots import use_lock

CONFIG_NAME = "pylmserv.toml"
LOCK_NAME = "pylmserv.lock"
SOURCE_TYPES = ("github", "git", "url")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst", ".tzst", ".zip")
URL_SCHEMES = ("https://", "http://", "file://")
TRACK_KINDS = ("releases", "tags", "branch")  # `track` key: what `pylmserv update` follows
MODEL_ROLES = ("chat", "embedding")
# [models.NAME.server] keys pylmserv sets itself (the model file, the bind, the key, the
# router's own settings) or that have their own spelling (role, --preload, --idle-unload).
SERVER_KEYS_OWNED = ("model", "m", "hf-repo", "hf", "hfr", "hf-file", "hff", "model-url", "mu", "alias", "a",
                     "host", "port", "api-key", "api-key-file", "ssl-key-file", "ssl-cert-file", "embedding",
                     "embeddings", "load-on-startup", "sleep-idle-seconds", "models-dir", "models-preset",
                     "models-max", "models-autoload", "no-models-autoload", "log-file")
_SERVER_KEY = re.compile(r"[a-z][a-z0-9-]*\Z")


# -- intent (pylmserv.toml) -----------------------------------------------------

class SourceSpec(Record):
    """A `[sources.NAME]` table: what the user wants built from."""

    __slots__ = ("name", "type", "ref", "owner", "repo", "url", "submodules", "unpack", "sha256", "meta", "follow")
    _defaults = {"ref": None, "owner": None, "repo": None, "url": None, "submodules": False, "unpack": False,
                 "sha256": None, "meta": Factory(dict), "follow": Factory(dict)}
    name: str
    type: str  # github | git | url
    ref: Optional[str]  # github, git
    owner: Optional[str]  # github
    repo: Optional[str]  # github
    url: Optional[str]  # git, url
    submodules: bool
    unpack: bool  # url
    sha256: Optional[Hash]  # url: a published flat pin, if any
    meta: Dict[str, object]  # other keys (e.g. version), passed through
    follow: Dict[str, str]  # track, tag-pattern: read by `update` only

    @property
    def mode(self) -> str:
        return "flat" if self.type == "url" and not self.unpack else "nar"

    def archive_url(self, rev: str) -> str:
        """For github sources: the tarball URL fetchFromGitHub uses."""
        return f"https://github.com/{self.owner}/{self.repo}/archive/{rev}.tar.gz"

    @property
    def git_url(self) -> str:
        if self.type == "github":
            return f"https://github.com/{self.owner}/{self.repo}.git"
        return self.url or ""


class ModelSpec(Record):
    """A `[models.NAME]` table: a GGUF file by URL or Hugging Face repo + file."""

    __slots__ = ("name", "url", "hf", "file", "revision", "sha256", "size", "description", "follow", "role", "server")
    _defaults = {"url": None, "hf": None, "file": None, "revision": "main", "sha256": None, "size": None,
                 "description": "", "follow": Factory(dict), "role": "chat", "server": Factory(dict)}
    name: str
    url: Optional[str]
    hf: Optional[str]
    file: Optional[str]
    revision: str
    sha256: Optional[Hash]
    size: Optional[int]
    description: str
    follow: Dict[str, str]  # track = "branch", branch: read by `update` only
    role: str  # `role = "embedding"`: served with llama-server's embeddings on (`serve`)
    server: Dict[str, object]  # [models.NAME.server]: llama-server options

    def resolve_url(self, endpoint: Optional[str] = None, revision: Optional[str] = None) -> str:
        if self.url:
            return self.url
        # lazy: the Hub client pulls in the download engine (~25 ms), which `build` and every
        # other command that only reads the project never need
        from ..transfer import hub

        return hub.resolve_url(self.hf, revision or self.revision, self.file, endpoint or hub.HUB)

    @property
    def filename(self) -> str:
        if self.file:
            return self.file.rsplit("/", 1)[-1]
        return (self.url or self.name).rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


class Config(Record):
    __slots__ = ("path", "sources", "models", "cache", "adopt_from", "mirrors")
    _defaults = {"cache": Factory(dict), "adopt_from": (), "mirrors": ()}
    path: Optional[Path]
    sources: Dict[str, SourceSpec]
    models: Dict[str, ModelSpec]
    cache: Dict[str, object]  # [cache]: substituters, trusted-public-keys
    adopt_from: Tuple[Path, ...]  # `adopt-from = [...]`: folders to look in before downloading
    mirrors: Tuple[str, ...]  # tried before the origin of every locked file (transfer/mirrors.py)


class Project(Record):
    __slots__ = ("config", "lock")
    config: Config
    lock: Lock

    @property
    def config_path(self) -> Optional[Path]:
        return self.config.path

    @property
    def lock_path(self) -> Optional[Path]:
        return self.lock.path

    @property
    def is_packaged_default(self) -> bool:
        return is_packaged(self.config.path)

    def use_as_gc_root(self) -> "Project":
        """Make this project's lock a gc root (store/roots): what it pins stays in the store.
        The commands that store things (fetch, build, serve through them) call it; loading
        a project writes nothing, so `list` and `doctor` leave the store as they found it."""
        if self.lock.path is not None and Path(self.lock.path).exists():
            use_lock(Path(self.lock.path))
        return self


# -- loading ---------------------------------------------------------------------

def packaged_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data"


def is_packaged(path: Optional[Path]) -> bool:
    """The one rule: is `path` (config or lock) the catalog inside the installed package,
    which is read-only by design?"""
    if path is None:
        return False
    where = Path(path).resolve()
    return packaged_dir() in where.parents


def default_config_path() -> Path:
    local = Path.cwd() / CONFIG_NAME
    return local if local.exists() else packaged_dir() / CONFIG_NAME


def load_project(config: Optional[Path] = None, lock: Optional[Path] = None) -> Project:
    """Config from --config, ./pylmserv.toml, or the packaged catalog; lock beside it."""
    config_path = Path(config) if config else default_config_path()
    lock_path = Path(lock) if lock else config_path.with_name(LOCK_NAME)
    return Project(config=load_config(config_path), lock=load_lock(lock_path))


def _read_toml(path: Path, what: str, hint: str) -> dict:
    try:
        text = read_project_file(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}", hint=hint) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                          hint=hint if what != "lock" else "Regenerate it with `pylmserv prefetch --refresh`.") from None
    fix = (f"Fix the syntax at that line and column of {path.name}." if what != "lock" else
           "The lock is generated: restore it from version control or regenerate it with `pylmserv prefetch --refresh`.")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", hint=fix) from None
    except RecursionError:
        data = None
    if data is None or _depth(data) > MAX_NESTING:
        raise ConfigError(f"{path}: values nested more than {MAX_NESTING} levels deep",
                          hint=f"No {what} needs such nesting; flatten the arrays/tables of {path.name}.")
    return data


MAX_NESTING = 16  # tables and arrays inside each other; real configs use 3


def _depth(value) -> int:
    """How deeply tables/arrays nest (iterative: hostile input cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_NESTING:
            return deepest
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def load_config(path: Path) -> Config:
    data = _read_toml(Path(path), "config", "Create pylmserv.toml or pass --config PATH.")
    _only_keys(data, {"sources", "models", "version", "cache", "adopt-from", "mirrors"}, str(path))
    sources = {name: _parse_source(name, t, path) for name, t in _tables(data, "sources", path).items()}
    models = {name: _parse_model(name, t, path) for name, t in _tables(data, "models", path).items()}
    mirrors = data.get("mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) and m.strip() for m in mirrors):
        raise ConfigError(f"{path}: mirrors must be a list of URLs",
                          hint='e.g. mirrors = ["oci://127.0.0.1:5000/models", "http://store.lan/blobs"]')
    for m in mirrors:  # the full check is transfer/mirrors.parse_mirror's, when a fetch uses them
        if not m.strip().lower().startswith(("http://", "https://", "file://", "oci://")):
            raise ConfigError(f"{path}: mirrors: unsupported mirror {show(repr(m.split('@')[-1]))}",
                              hint="Use http(s)://BASE or file:///BASE (BASE/sha256/HEX), or oci://HOST[:PORT]/REPO.")
    return Config(path=Path(path), sources=sources, models=models, cache=_parse_cache(data.get("cache", {}), path),
                  adopt_from=_adopt_from(data, Path(path)), mirrors=tuple(m.strip() for m in mirrors))


def _parse_cache(t, path) -> Dict[str, object]:
    """[cache]: substituters (URLs of shared build caches, tried in order) and
    trusted-public-keys (Nix-format ed25519 public keys; a substitute must be signed by one)."""
    where = f"{path}: [cache]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where} must be a table")
    _only_keys(t, {"substituters", "trusted-public-keys"}, where)
    for key in ("substituters", "trusted-public-keys"):
        value = t.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} {key} must be a list of strings")
    keys = t.get("trusted-public-keys", [])
    if keys:
        # lazy for speed: only a config with trusted keys needs the signing module (a dataclass
        # and base64 handling an up-to-date `build` of an ordinary project never uses; ~11 M
        # instructions)
        from ..core.signing import PublicKey
    for text in keys:
        try:
            PublicKey.parse(text)
        except UsageError as exc:
            raise ConfigError(f"{where} trusted-public-keys: {exc.message}", hint=exc.hint) from None
    return {k: list(t[k]) for k in ("substituters", "trusted-public-keys") if k in t}


def _adopt_from(data: dict, path: Path) -> Tuple[Path, ...]:
    """`adopt-from = ["~/models", ...]`: folders (relative ones from the config's folder)."""
    value = data.get("adopt-from", [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: adopt-from must be a list of folder paths (strings)",
                          hint='e.g. adopt-from = ["~/models", "/srv/gguf"]')
    return tuple(path.parent / Path(v).expanduser() for v in value)


def _tables(data: dict, key: str, path) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{path}: [{key}] must be a table of tables, e.g. [{key}.NAME]")
    for name in value:
        check_name(name, f"{path}: [{key}]")
    return value


def _follow(t: dict, where: str, keys: tuple) -> Dict[str, str]:
    """The `track` keys (what `pylmserv update` follows), checked here so every command agrees."""
    out = {k: _opt(t, k, where, str) for k in keys if k in t}
    track = out.get("track")
    if track is not None and track not in TRACK_KINDS:
        raise ConfigError(f"{where}: unknown track {track!r}", hint="Use track = \"releases\", \"tags\" or \"branch\".")
    pattern = out.get("tag-pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}: tag-pattern {pattern!r} is not a regular expression: {exc}") from None
    return out


def _only_keys(table: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", hint="Allowed: " + ", ".join(sorted(allowed)))


def _need(table: dict, key: str, where: str, kind=str):
    if key not in table:
        raise ConfigError(f"{where}: missing field '{key}'", hint=f"Add {key} = ... to that table.")
    value = table[key]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise ConfigError(f"{where}: field '{key}' must be a non-empty {kind.__name__}")
    return value


def _opt(table: dict, key: str, where: str, kind=str, default=None):
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: field '{key}' must be a {kind.__name__}")
    if kind is int and value < 0:
        raise ConfigError(f"{where}: field '{key}' must not be negative")
    return value


def _check_url(url: str, where: str) -> str:
    if not url.startswith(URL_SCHEMES):
        raise ConfigError(f"{where}: unsupported URL {url!r}", hint="Use an https://, http:// or file:// URL.")
    return url


def _parse_hash(text, where: str, key: str = "sha256") -> Hash:
    if not isinstance(text, str):
        raise ConfigError(f"{where}: field '{key}' must be a string")
    try:
        return Hash.parse(text, algo="sha256" if key == "sha256" else None)
    except HashError as exc:
        raise ConfigError(f"{where}: bad {key}: {exc.message}", hint=exc.hint) from None


def _checked(t: dict, where: str) -> None:
    """Names and values: everything that can reach the lock must survive Nix's fromTOML."""
    for key, value in t.items():
        check_nix_value(value, f"{where} {key}", url=key == "url")


def _parse_source(name: str, t: dict, path) -> SourceSpec:
    where = f"{path}: [sources.{show(name)}]"
    check_name(name, f"{path}: [sources]")
    _checked({k: v for k, v in t.items() if k != "description"}, where)
    for key in ("version", "cosmocc"):
        if key in t:
            check_version(t[key], f"{where} {key}")
    stype = _need(t, "type", where)
    if stype not in SOURCE_TYPES:
        raise ConfigError(f"{where}: unknown source type {stype!r}", hint="Use type = \"github\", \"git\" or \"url\".")
    known = {"type", "description", "version", "cosmocc", "track", "tag-pattern"}
    meta = {k: t[k] for k in ("description", "version", "cosmocc") if k in t}
    follow = _follow(t, where, ("track", "tag-pattern"))
    if stype == "github":
        _only_keys(t, known | {"owner", "repo", "ref", "submodules"}, where)
        return SourceSpec(name, stype, ref=_need(t, "ref", where), owner=_need(t, "owner", where),
                          repo=_need(t, "repo", where), submodules=_opt(t, "submodules", where, bool, False), meta=meta,
                          follow=follow)
    if stype == "git":
        _only_keys(t, known | {"url", "ref", "submodules"}, where)
        url = _need(t, "url", where)
        if not url.startswith(URL_SCHEMES + ("git@", "ssh://", "git://")) and not Path(url).is_absolute():
            raise ConfigError(f"{where}: unsupported git URL {url!r}", hint="Use https://, ssh://, git:// or file://.")
        return SourceSpec(name, stype, url=url, ref=_need(t, "ref", where),
                          submodules=_opt(t, "submodules", where, bool, False), meta=meta, follow=follow)
    _only_keys(t, known | {"url", "unpack", "sha256"}, where)
    url = _check_url(_need(t, "url", where), where)
    unpack = _opt(t, "unpack", where, bool, False)
    if unpack and not url.split("?", 1)[0].endswith(ARCHIVE_SUFFIXES):
        raise ConfigError(f"{where}: unpack = true but {url!r} is not a known archive",
                          hint="Supported: " + ", ".join(ARCHIVE_SUFFIXES))
    sha = _parse_hash(t["sha256"], where) if "sha256" in t else None
    return SourceSpec(name, stype, url=url, unpack=unpack, sha256=sha, meta=meta, follow=follow)


def _parse_model(name: str, t: dict, path) -> ModelSpec:
    where = f"{path}: [models.{show(name)}]"
    check_name(name, f"{path}: [models]")
    _checked({k: v for k, v in t.items() if k not in ("description", "server")}, where)  # server: never locked
    _only_keys(t, {"url", "hf", "file", "revision", "sha256", "size", "description", "track", "branch", "role",
                   "server"}, where)
    follow = _follow(t, where, ("track", "branch"))
    serving = {"role": _opt(t, "role", where, str, "chat"), "server": _parse_server(t.get("server", {}), where)}
    if serving["role"] not in MODEL_ROLES:
        raise ConfigError(f"{where}: unknown role {show(repr(serving['role']))}",
                          hint="Use role = \"chat\" (the default) or role = \"embedding\".")
    if ("url" in t) == ("hf" in t):
        raise ConfigError(f"{where}: give either url or hf (+ file)", hint="e.g. hf = \"org/repo\" and file = \"model.gguf\".")
    sha = _parse_hash(t["sha256"], where) if "sha256" in t else None
    size = _opt(t, "size", where, int)
    desc = _opt(t, "description", where, str, "")
    if "url" in t:
        return ModelSpec(name, url=_check_url(_need(t, "url", where), where), sha256=sha, size=size, description=desc,
                         follow=follow, **serving)
    hf = _need(t, "hf", where)
    if hf.count("/") != 1 or not all(_plain_segment(p) for p in hf.split("/")):
        raise ConfigError(f"{where}: hf must be 'org/repo', got {show(repr(hf))}", hint="e.g. hf = \"Qwen/Qwen2.5-0.5B-Instruct-GGUF\".")
    file = _need(t, "file", where)
    if not all(_plain_segment(p) for p in file.split("/")):
        raise ConfigError(f"{where}: file must be a path inside the repository, got {show(repr(file))}",
                          hint="No empty, '.' or '..' parts, no leading '/'.")
    revision = _opt(t, "revision", where, str, "main")
    if not revision.strip():
        raise ConfigError(f"{where}: empty revision", hint="Use a branch, tag or commit, or leave it out (main).")
    return ModelSpec(name, hf=hf, file=file, revision=revision, sha256=sha, size=size, description=desc,
                     follow=follow, **serving)


def _parse_server(table, where: str) -> Dict[str, object]:
    """[models.NAME.server]: llama-server options by long name without dashes (`ctx-size = 4096`,
    `n-gpu-layers = 99`, `flash-attn = "on"`, `jinja = true`), as llama.cpp's router presets
    spell them; one line each, nothing pylmserv sets itself."""
    where = f"{where}.server"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table", hint="e.g. [models.NAME.server] with ctx-size = 4096.")
    out: Dict[str, object] = {}
    for key, value in table.items():
        if not _SERVER_KEY.match(key):
            raise ConfigError(f"{where}: bad option name {show(repr(key))}",
                              hint="Use llama-server's long option without dashes, e.g. ctx-size or n-gpu-layers.")
        if key in SERVER_KEYS_OWNED:
            raise ConfigError(f"{where}: {key} is set by pylmserv",
                              hint="The model file, bind address and API key come from the lock and `serve`'s own "
                                   "options; embeddings from role = \"embedding\"; loading from --preload/--idle-unload.")
        if isinstance(value, str):
            if value != value.strip() or not value or re.search(r"[\x00-\x1f\x7f]|[ \t][;#]|^[;#]", value):
                raise ConfigError(f"{where}: {key} = {show(repr(value))} cannot be carried to llama-server",
                                  hint="One line, no surrounding spaces, no ' ;' or ' #' (a preset comment).")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number")
        elif not isinstance(value, (bool, int, float)):
            raise ConfigError(f"{where}: {key} must be a string, number or boolean")
        out[key] = value
    return out


def _plain_segment(part: str) -> bool:
    return part not in ("", ".", "..") and "\\" not in part
