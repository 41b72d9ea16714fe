"""Fetch models into the store, verified: the library behind `pylmserv fetch`.

Items are lock names (url + hash + size from pylmserv.lock), hf://org/repo/path@rev
(hash and size from the Hub API, HF_ENDPOINT), or http(s)/file URLs with a sha256.
A name or URL without a known hash is refused unless trust_on_first_use, which records
the hash it saw in the lock. Each file lands as blobs/sha256/<hex> (download.download,
then a GGUF header check) and is linked as models/<name>/<filename>; split sets are
fetched whole; archives are verified, then unpacked with the data policy.
"""
from __future__ import annotations

from ..core.log import get_logger
import os
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import quote, unquote, urlsplit

from ..core.errors import UsageError, VerificationError
from ..core.fsutil import remove_no_follow, unlink_missing_ok, walk_no_follow
from ..core.gguf import check_split_set, read_header, split_info, split_names
from ..core.hashing import Hash
from ..core.names import pin_name
from ..core.record import Record, hash_by_value
from ..pins.config import ARCHIVE_SUFFIXES, Project, load_project
from ..pins.lock import FilePin, HfPin, LockEntry, Shard
from ..pins.lockfile import refuse_packaged, update
from ..store import adopt as adopting
from ..store import blobs as store
from ..transfer import http, hub, mirrors as mirror_chain
from ..transfer.download import redact, resolve_stall_limit
from ..transfer.http import refuse_credentials

log = get_logger("pylmserv.models")

OFFLINE_ENV = ("HF_HUB_OFFLINE", "PYLMSERV_OFFLINE")


# Records and a plain class, not dataclasses: every `fetch` imports this module, and a dataclass
# costs ~4 M instructions to create at import.
class FetchResult(Record):
    __slots__ = ("name", "path", "size", "sha256", "seconds", "bytes_downloaded", "files", "dest")
    _defaults = {"files": (), "dest": None}
    name: str
    path: Path  # the named entry: the file (first shard of a split set) or unpacked directory
    size: int  # bytes of all files of the item
    sha256: Hash  # of the file (first shard; the archive for archives)
    seconds: float
    bytes_downloaded: int  # 0 when everything was already in the store
    files: Tuple[Path, ...]
    dest: Optional[Path]  # the copy/link placed in --dest

    __hash__ = hash_by_value

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "size": self.size, "sha256": self.sha256.hex,
                "seconds": round(self.seconds, 3), "bytes_downloaded": self.bytes_downloaded,
                "files": [str(p) for p in self.files], "dest": str(self.dest) if self.dest else None}


class _File(Record):  # never changed after planning
    __slots__ = ("url", "filename", "expected", "size")
    url: str
    filename: str
    expected: Optional[Hash]
    size: Optional[int]


class _Plan:
    """What to fetch for one item. Mutable: a config name planned through its hf:// URL
    takes the item's name (and so does its TOFU record)."""

    __slots__ = ("name", "files", "archive", "record")

    def __init__(self, name: str, files: List[_File], archive: bool = False, record: Optional[_Draft] = None):
        self.name = name
        self.files = files
        self.archive = archive
        self.record = record  # the lock entry to write once hashes are known (TOFU)

    def __repr__(self) -> str:
        return f"_Plan(name={self.name!r}, files={self.files!r}, archive={self.archive!r}, record={self.record!r})"


# -- public API ------------------------------------------------------------------------

def fetch(items: Union[str, Sequence[str]], dest: Optional[Path] = None, connections: int = 8,
          offline: bool = False, sha256: Union[None, str, Hash] = None, trust_on_first_use: bool = False,
          config: Optional[Path] = None, lock: Optional[Path] = None, progress: bool = True,
          home: Optional[Path] = None, link_mode: Optional[str] = None,
          stall_limit: Optional[float] = None, adopt: bool = True) -> List[FetchResult]:
    """Make every item present and verified in the store; returns one result per item
    (FetchResult.to_json() is what `pylmserv fetch --json` prints). `stall_limit`:
    seconds without new data before a download gives up (default $PYLMSERV_STALL_LIMIT,
    else 120). `adopt`: first look for a missing file in other tools' caches (store/adopt)."""
    if isinstance(items, str):
        items = [items]
    items = list(items)
    if not items:
        raise UsageError("nothing to fetch", hint="Name a model from the lock, an hf:// path or a URL.")
    if connections < 1 or connections > 64:
        raise UsageError(f"--connections must be between 1 and 64, got {connections}")
    stall_limit = resolve_stall_limit(stall_limit)
    offline = offline or any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_ENV)
    expected = _parse_sha256(sha256)
    urls = [i for i in items if _is_url(i)]
    if expected is not None and len(urls) != 1:
        raise UsageError("--sha256 applies to exactly one URL item",
                         hint="Fetch URLs one at a time, each with its own --sha256.")
    project = _load_project(config, lock, items)
    adopting.configure(adopting.default_places(project.config.adopt_from if project else ()) if adopt else [])
    plans = [_plan(item, project, expected if _is_url(item) else None, trust_on_first_use, offline)
             for item in items]
    if any(plan.record is not None for plan in plans):
        _tofu_lock_path(project)  # refuse before downloading, not after
    sources = mirror_chain.configured(project.config.mirrors if project is not None else ())
    if offline:
        _refuse_missing_offline(plans, sources, store.root(home))
    if not offline and any(f.expected is None or not store.has_blob(f.expected, store.root(home))
                           for plan in plans for f in plan.files):
        http.load()  # once per process, before the clock of the first model's transfer starts
    results = []
    for plan in plans:
        results.append(_fetch_plan(plan, project, dest, connections, offline, progress, home, link_mode,
                                   stall_limit, sources))
    return results


def download_models(names: Iterable[str], target_dir: Union[str, Path]) -> List[Path]:
    """Seed-compatible API: fetch `names` and place the files in `target_dir`."""
    results = fetch(list(names), dest=Path(target_dir))
    return [r.dest or r.path for r in results]


# -- planning: item -> files with known (or to-be-trusted) hashes --------------------------

class _Draft(Record):
    """A pin still without its hash (trust on first use): its kind and fields."""

    __slots__ = ("cls", "fields")
    cls: type
    fields: dict

    def named(self, name: str) -> "_Draft":
        return _Draft(self.cls, {**self.fields, "name": name})

    def pin(self, hash: Hash, size: Optional[int], shards) -> LockEntry:
        return self.cls(kind="models", hash=hash, size=size, shards=tuple(shards), **self.fields)


def _is_url(item: str) -> bool:
    return item.startswith(("http://", "https://", "file://", "hf://"))


def _parse_sha256(value) -> Optional[Hash]:
    if value is None or isinstance(value, Hash):
        return value
    h = Hash.parse(value, algo=None if "-" in value or ":" in value else "sha256")
    if h.algo != "sha256":
        raise UsageError(f"--sha256 needs a sha256 hash, got {h.algo}")
    return h


def _load_project(config, lock, items) -> Optional[Project]:
    needs = bool(config or lock) or any(not _is_url(i) for i in items)
    try:
        return load_project(config, lock).use_as_gc_root()  # fetch stores what the lock pins
    except UsageError:
        if needs:
            raise
        return None  # plain URLs work without any catalog


def _filename_of(url: str) -> str:
    return unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]) or "download"


def _name_for(filename: str) -> str:
    for suffix in (".gguf",) + ARCHIVE_SUFFIXES:
        if filename.lower().endswith(suffix):
            filename = filename[: -len(suffix)]
            break

    info = split_info(filename + ".gguf")
    return info[0] if info else filename


def _is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def _plan(item: str, project: Optional[Project], sha256: Optional[Hash], tofu: bool, offline: bool) -> _Plan:
    if "://" in item:  # any scheme, any case (HTTP://u:p@host): no credential is echoed or used
        refuse_credentials(item, "fetch")
    if item.startswith("hf://"):
        return _plan_hf(item, project, tofu, offline)
    if _is_url(item):
        refuse_credentials(item, "fetch")
        filename = _filename_of(item)
        name = _name_for(filename)
        if sha256 is None:
            entry = _lock_entry_for_url(project, item)
            if entry is not None:
                return _plan_lock(entry.name, entry)
            if not tofu:
                raise UsageError(f"no known sha256 for {item}",
                                 hint="Pass --sha256 HASH (hex or SRI), or --trust-on-first-use to record "
                                      "the hash of what the server sends in the lock.")
            record = _Draft(FilePin, {"name": pin_name(name), "url": item})
            return _Plan(name, _url_files(item, filename, None, None, tofu), _is_archive(filename), record=record)
        return _Plan(name, _url_files(item, filename, sha256, None, tofu), _is_archive(filename))
    if project is None:
        raise UsageError(f"unknown model {item!r}", hint="Give a name from pylmserv.lock, an hf:// path or a URL.")
    entry = project.lock.models.get(item)
    if entry is not None:
        return _plan_lock(item, entry)
    spec = project.config.models.get(item)
    if spec is None:
        names = sorted(set(project.lock.models) | set(project.config.models))
        raise UsageError(f"unknown model {item!r}",
                         hint="Known names: " + ", ".join(names) if names else "The catalog has no models.")
    if spec.sha256 is not None:
        url = hub.on_endpoint(spec.resolve_url())
        return _Plan(item, _url_files(url, spec.filename, spec.sha256, spec.size, tofu), _is_archive(spec.filename))
    if not tofu:
        raise UsageError(f"model {item!r} is in {project.config.path.name if project.config.path else 'the config'} "
                         f"but has no pin in the lock",
                         hint=f"Run `pylmserv prefetch {item}` to pin it, or pass --trust-on-first-use to "
                              "record the hash of what is downloaded now.")
    if offline:
        raise UsageError(f"model {item!r} has no pin and cannot be trusted on first use offline",
                         hint="Run once without --offline / HF_HUB_OFFLINE.")
    if spec.hf:
        plan = _plan_hf(f"hf://{spec.hf}/{spec.file}@{spec.revision}", project, True, offline)
        plan.name = item
        if plan.record is not None:
            plan.record = plan.record.named(item)
        return plan
    record = _Draft(FilePin, {"name": item, "url": spec.url or ""})
    return _Plan(item, _url_files(spec.url or "", spec.filename, None, spec.size, True),
                 _is_archive(spec.filename), record)


def _url_files(url: str, filename: str, expected: Optional[Hash], size: Optional[int], tofu: bool) -> List[_File]:
    """The file behind `url`, or every shard of its split set (same directory URL)."""
    names = split_names(filename)
    if len(names) == 1:
        return [_File(url, filename, expected, size)]
    base = url.split("?", 1)[0].rsplit("/", 1)[0]
    files = []
    for n in names:
        if n == filename:
            files.append(_File(url, n, expected, size))
        else:
            if not tofu:
                raise UsageError(f"{filename} is part of a {len(names)}-file split set; {n} has no known sha256",
                                 hint="Pin the whole set in the lock (shards), or pass --trust-on-first-use.")
            files.append(_File(f"{base}/{quote(n)}", n, None, None))
    files.sort(key=lambda f: names.index(f.filename))
    return files


def _lock_entry_for_url(project: Optional[Project], url: str) -> Optional[LockEntry]:
    if project is None:
        return None
    for entry in project.lock.models.values():
        if entry.url == url:
            return entry
    return None


def _plan_lock(name: str, entry: LockEntry) -> _Plan:
    if entry.mode != "flat":
        raise UsageError(f"models.{name}: mode {entry.mode!r} is not supported for models",
                         hint="Model pins are flat sha256 hashes of the file.")
    filename = _filename_of(getattr(entry, "file", None) or entry.url)
    files = [_File(hub.on_endpoint(entry.url), filename, entry.hash, entry.size)]
    shards = getattr(entry, "shards", ())
    if shards:  # the lock reader has checked their shape
        for shard in shards:
            files.append(_File(hub.on_endpoint(shard.url), _filename_of(shard.file), shard.hash, shard.size))
    else:
        info = split_info(filename)
        if info and info[2] > 1:
            raise UsageError(f"models.{name} is shard 1 of a {info[2]}-file split set but the lock pins only it",
                             hint=f"Re-pin it with its shards: `pylmserv prefetch --refresh {name}`.")
    return _Plan(name, files, _is_archive(filename))


# -- Hugging Face ----------------------------------------------------------------------------

def _plan_hf(item: str, project: Optional[Project], tofu: bool, offline: bool) -> _Plan:
    repo, path, revision = hub.parse_hf(item)
    filename = path.rsplit("/", 1)[-1]
    name = _name_for(filename)
    # A lock entry for the same repo/file at the same revision needs no network at all.
    if project is not None:
        for entry in project.lock.models.values():
            if isinstance(entry, HfPin) and (entry.hf, entry.file) == (repo, path) and revision in (entry.rev, "main"):
                if revision == entry.rev or offline:
                    return _plan_lock(entry.name, entry)
    if offline:
        stored = store.lookup(name)
        if stored is not None and stored.files[0].path.name == filename and stored.files[0].sha256:
            # Fetched before (hash verified then): the store alone answers.
            return _Plan(name, [_File("", f.path.name, f.sha256, f.size) for f in stored.files])
        raise UsageError(f"{item}: not in the store, and resolving it needs the network",
                         hint="Run once without --offline / HF_HUB_OFFLINE, or pin it in pylmserv.lock.")

    commit = hub.resolve_commit(repo, revision, item)
    directory = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    wanted = [directory + n for n in split_names(filename)]
    meta = hub.files_at(repo, commit, wanted, item)  # a missing file: UsageError, as in prefetch
    if meta is None:
        log.info("%s: the Hub offers no file metadata API; no published sha256", item)
    files = []
    for p in wanted:
        info = meta[p] if meta is not None else None
        expected = info.sha256 if info is not None else None
        if expected is None and not tofu:
            why = "not an LFS file" if meta is not None else "the Hub has no metadata API"
            raise UsageError(f"{repo}/{p}: the Hub publishes no sha256 for it ({why})",
                             hint="Pass --trust-on-first-use to record the hash of what is downloaded now, "
                                  "or pin it with `pylmserv prefetch` (which downloads and hashes it).")
        files.append(_File(hub.resolve_url(repo, commit, p), p.rsplit("/", 1)[-1], expected,
                           info.size if info is not None else None))
    canonical = hub.resolve_url(repo, commit, path, hub.HUB)
    record = _Draft(HfPin, {"name": pin_name(name), "url": canonical, "rev": commit, "hf": repo, "file": path,
                            "revision": revision}) if tofu else None
    return _Plan(name, files, _is_archive(filename), record=record)


# -- fetching ------------------------------------------------------------------------------

def _fetch_plan(plan: _Plan, project, dest, connections, offline, progress, home, link_mode,
                stall_limit=None, mirrors=()) -> FetchResult:
    started = time.monotonic()
    home = store.root(home)
    got: List[Tuple[_File, Hash, int]] = []
    downloaded = 0
    for f in plan.files:
        h, size, nbytes = _ensure_blob(f, connections, offline, progress, home, check_gguf=not plan.archive,
                                       stall_limit=stall_limit, mirrors=mirrors)
        got.append((f, h, size))
        downloaded += nbytes
    if plan.archive:
        path, files = _unpack(plan.name, got[0][1], home)
        total = sum(p.stat().st_size for p in files)
    else:
        files = [store.link_named(plan.name, h, f.filename, home=home, mode=link_mode) for f, h, _ in got]
        if len(got) > 1:
            store.set_order(plan.name, [f.filename for f, _, _ in got], home=home)
        if len(files) > 1 or _split(files[0]):
            try:
                check_split_set(files)
            except VerificationError:
                _remove(store.entry_dir(plan.name, home))  # no half-valid entry
                raise
        path = files[0]
        total = sum(size for _, _, size in got)
    if plan.record is not None:
        _record_tofu(plan, got, project)
    placed = _place_dest(plan, got, files, dest, link_mode, home) if dest else None
    return FetchResult(plan.name, path, total, got[0][1], time.monotonic() - started, downloaded,
                       tuple(files), placed)


def _split(path: Path) -> bool:
    return split_info(path.name) is not None


def _ensure_blob(f: _File, connections, offline, progress, home, check_gguf: bool,
                 stall_limit: Optional[float] = None, mirrors=()) -> Tuple[Hash, int, int]:
    """(hash, size, bytes downloaded) of `f`, in the store afterwards."""
    if f.expected is not None and store.has_blob(f.expected, home):
        size = store.blob_path(f.expected, home).stat().st_size
        if f.size is None or size == f.size:
            log.info("%s: in the store (sha256 %s)", f.filename, f.expected.hex[:12])
            return f.expected, size, 0
    adopted = adopting.before_download(f.expected, f.size, f.filename, f.url, home)  # other tools' copies
    if adopted is not None:
        return adopted
    if offline and not mirror_chain.offline_sources(mirrors, f.expected):
        raise UsageError(f"{f.filename} is not in the store and --offline (or HF_HUB_OFFLINE) forbids downloading",
                         hint="Run the same command without --offline once.")
    if not f.url and not offline:
        raise UsageError(f"{f.filename}: no URL to download from")
    key = f.expected or Hash.of_bytes(f.url.encode())
    with store.blob_lock(key, home):
        if f.expected is not None and store.has_blob(f.expected, home, f.size):
            return f.expected, store.blob_path(f.expected, home).stat().st_size, 0  # a concurrent fetch won
        log.info("fetching %s", redact(f.url))
        staged = store.temp_path(f.filename, home)
        try:
            result = mirror_chain.fetch_verified(  # mirrors first, then the origin; each source checked
                f.url, staged, f.expected, f.size, mirrors=mirrors, tmp_dir=store.tmp_dir(home), offline=offline,
                origin_headers=hub.auth_headers(f.url) if f.url else None, connections=connections,
                progress=progress, stall_limit=stall_limit)
            if check_gguf and _gguf_name(f.filename):
                read_header(staged)
            blob = store.install_blob(staged, result.sha256, home)
        finally:
            unlink_missing_ok(staged)
    log.info("%s: verified sha256 %s (%d bytes) -> %s", f.filename, result.sha256.hex, result.size, blob)
    return result.sha256, result.size, result.bytes_downloaded


def _refuse_missing_offline(plans, mirrors, home: Path) -> None:
    """Offline: name every file the store lacks (and neither another tool's copy nor a
    file:// mirror could give) at once."""
    def present(f) -> bool:
        if f.expected is not None and store.has_blob(f.expected, home, f.size):
            return True
        return adopting.before_download(f.expected, f.size, f.filename, f.url, home) is not None

    missing = [f"{plan.name}: {f.filename}" + (f" (sha256 {f.expected.hex[:12]}...)" if f.expected else "")
               for plan in plans for f in plan.files
               if not present(f) and not mirror_chain.offline_sources(mirrors, f.expected)]
    if missing:
        raise UsageError(f"offline (--offline, PYLMSERV_OFFLINE or HF_HUB_OFFLINE), and {len(missing)} file(s) "
                         "are not in the store: " + "; ".join(missing),
                         hint="Fetch them once with the network, import a bundle (`pylmserv import FILE`), "
                              "or name a file:// mirror (PYLMSERV_MIRRORS).")


def _gguf_name(filename: str) -> bool:
    return filename.lower().endswith(".gguf")


def _unpack(name: str, archive_hash: Hash, home: Path) -> Tuple[Path, List[Path]]:
    """Unpack a verified archive blob into models/<name>/ (data policy: nothing escapes)."""
    target = store.entry_dir(name, home)
    manifest = target / store.MANIFEST
    existing = store.lookup(name, home)
    if existing is not None and _manifest_archive(manifest) == archive_hash.hex:
        files = [f.path for f in existing.files]
        return _entry_path(target, files), files
    # lazy for speed: the archive engine (and tempfile) only when an archive is unpacked, not on
    # every fetch of a model file
    from ..core.archive import extract

    staging = store.tmp_dir(home) / f"unpack-{name}.{os.getpid()}"
    _remove(staging)
    try:
        extract(store.blob_path(archive_hash, home), staging, policy="data")
        rels = sorted(os.path.relpath(os.path.join(d, f), staging) for d, _, files in walk_no_follow(staging)
                      for f in files if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f)))
        rels.sort(key=lambda rel: not _gguf_name(rel))  # models first: lookup(name).path is one
        for rel in rels:
            if _gguf_name(rel):
                read_header(staging / rel)
        store.write_tree_manifest(staging, archive_hash, [(rel, (staging / rel).stat().st_size) for rel in rels])
        old = None
        if target.exists():
            old = target.with_name(f".{name}.old.{os.getpid()}")
            os.replace(target, old)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
        if old is not None:
            _remove(old)
    finally:
        _remove(staging)
    files = [target / rel for rel in rels]
    return _entry_path(target, files), files


def _manifest_archive(manifest: Path) -> Optional[str]:
    import json

    try:
        return json.loads(manifest.read_text()).get("archive", {}).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _entry_path(target: Path, files: List[Path]) -> Path:
    ggufs = [p for p in files if _gguf_name(p.name)]
    if len(ggufs) == 1:
        return ggufs[0]
    firsts = [p for p in ggufs if (lambda i: i and i[1] == 1)(_split_info(p.name))]
    return firsts[0] if len(firsts) == 1 else target


def _split_info(name: str):
    return split_info(name)


def _place_dest(plan: _Plan, got, files: List[Path], dest: Path, link_mode, home: Path) -> Path:
    """--dest DIR: the file(s) placed there too (hardlink when possible, else copy)."""
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    if plan.archive:
        out = dest / plan.name
        _copy_contained(store.entry_dir(plan.name, home), out, plan.name)
        return out
    placed = []
    for f, h, _ in got:
        if f.filename in ("", ".", "..") or "/" in f.filename or "\\" in f.filename:
            raise UsageError(f"{plan.name}: refusing to place a file named {f.filename!r} in {dest}")
        target = dest / f.filename
        if not target.exists() or not os.path.samefile(target, store.blob_path(h, home)):
            # A symlink into a cache the user may clear is a trap in a user directory.
            mode = link_mode if link_mode in ("hardlink", "copy") else None
            try:
                store.place(store.blob_path(h, home), target, mode=mode or "hardlink")
            except OSError:
                store.place(store.blob_path(h, home), target, mode="copy")
        placed.append(target)
    return placed[0]


def _copy_contained(src: Path, out: Path, name: str) -> None:
    """Copy the unpacked entry `src` to `out`, never leaving it: directories and regular
    files are copied, symlinks are recreated as symlinks (never followed, so a link to
    an ancestor is no endless tree) and only when they resolve inside `src`. `out` is
    replaced whole (a symlink there is removed, never followed)."""
    import shutil  # lazy for speed: only --dest of an archive copies files
    import stat

    root = os.path.realpath(src)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        tmp.mkdir()
        for dirpath, dirnames, filenames in walk_no_follow(src):
            rel = os.path.relpath(dirpath, src)
            here = tmp if rel == "." else tmp / rel
            for entry in sorted(dirnames + filenames):
                if rel == "." and entry == store.MANIFEST:
                    continue
                source = os.path.join(dirpath, entry)
                st = os.lstat(source)
                if stat.S_ISLNK(st.st_mode):
                    link = os.readlink(source)
                    real = os.path.realpath(source)
                    if os.path.isabs(link) or not (real == root or real.startswith(root + os.sep)):
                        raise VerificationError(
                            f"{name}: the store entry has a symlink {os.path.join(rel, entry)!r} -> {link!r} "
                            "that leaves the model folder; nothing was copied",
                            hint=f"The entry was modified after unpacking: run `pylmserv verify {name}`, "
                                 "then fetch it again.")
                    os.symlink(link, here / entry)
                elif stat.S_ISDIR(st.st_mode):
                    (here / entry).mkdir()
                elif stat.S_ISREG(st.st_mode):
                    shutil.copyfile(source, here / entry, follow_symlinks=False)
                    os.chmod(here / entry, stat.S_IMODE(st.st_mode) | 0o200)
                else:
                    raise VerificationError(f"{name}: the store entry holds a special file "
                                            f"{os.path.join(rel, entry)!r}; nothing was copied",
                                            hint=f"Run `pylmserv verify {name}`, then fetch it again.")
        _remove(out)
        os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    """Delete a file, a symlink (not what it points at) or a directory tree (no link
    followed, no depth limit)."""
    remove_no_follow(path)


def _record_tofu(plan: _Plan, got, project: Optional[Project]) -> None:
    """Trust on first use: write what was verified-by-download into the lock (the one
    read-merge-write path, under the lock's file lock)."""

    path = _tofu_lock_path(project)
    first_file, first_hash, first_size = got[0]
    shards = tuple(Shard(f.filename, _canonical_url(f.url), h, s) for f, h, s in got[1:])
    entry = plan.record.pin(first_hash, first_size, shards)
    update(path, lambda current: current.with_entry(entry))
    log.info("recorded %s in %s (trust on first use): %s", entry.name, path, first_hash.sri)


def _tofu_lock_path(project: Optional[Project]) -> Path:
    if project is None or project.lock.path is None:
        raise UsageError("--trust-on-first-use needs a lock file to record the hash in",
                         hint="Pass --lock PATH (it is created if missing).")
    path = Path(project.lock.path)
    refuse_packaged(path)
    return path


def _canonical_url(url: str) -> str:
    endpoint = hub.endpoint()
    if endpoint != hub.HUB and url.startswith(endpoint + "/"):
        return hub.HUB + url[len(endpoint):]
    return url
