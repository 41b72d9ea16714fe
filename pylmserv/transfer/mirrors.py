"""Mirrors: other sources for a file whose sha256 the lock names, tried before its origin.

A mirror is trusted for nothing: every byte it sends is checked against the lock's hash
(and size) before it is kept, so a colleague's store, a registry or a USB stick is as
safe as the origin. Kinds (one string each, in `mirrors = [...]` of pylmserv.toml or in
$PYLMSERV_MIRRORS, space-separated; the variable, when set, wins, and set empty turns the
config's list off):

  http(s)://BASE, file:///BASE   content-addressed: the file is BASE/sha256/<hex>, the
                                 layout of a store's blobs/sha256/, so another machine's
                                 store served read-only (nginx on PYLMSERV_HOME/blobs) is a
                                 mirror. Fetched by download() itself: resume, parallel
                                 ranges and stall limits work as against an origin.
  oci://HOST[:PORT]/REPO         an OCI registry: the blob whose digest is the lock's
                                 sha256 (what `pylmserv push` uploads), pulled by digest,
                                 no tag trusted; resumed with Range.

The chain, `fetch_verified`: each mirror in order, then the origin. A mirror that answers
with other bytes is named on stderr and skipped (its bytes are deleted); one that is down
or lacks the file is noted at info level; when every source fails, one error line names
each with its reason, and nothing was kept. Offline, only file:// mirrors are tried.
"""
from __future__ import annotations

import hashlib
from ..core.log import get_logger
import os
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence
from urllib.parse import urlsplit

from ..core.errors import ConfigError, DiskSpaceError, NetworkError, PylmservError, VerificationError
from ..core.fsutil import unlink_missing_ok
from ..core.hashing import Hash
from ..core.progress import Progress
from ..core.record import Record, hash_by_value
from .download import DownloadResult, download, redact, resolve_stall_limit

log = get_logger("pylmserv.mirrors")

MIRRORS_ENV = "PYLMSERV_MIRRORS"


class Mirror(Record):  # a Record, not a dataclass: `fetch` imports this module (~4 M instructions a dataclass)
    __slots__ = ("spec", "kind")
    spec: str
    kind: str  # "http" (http, https, file) or "oci"

    __hash__ = hash_by_value

    def __str__(self) -> str:
        return str(_oci().OciRef.parse(self.spec)) if self.kind == "oci" else redact(self.spec)

    def blob_url(self, h: Hash) -> str:
        return self.spec.rstrip("/") + f"/sha256/{h.hex}"


def _oci():
    """transfer/oci.py, imported where an oci:// mirror is named: lazy for speed, as most fetches
    name none and the registry client is ~1 ms to import."""
    from . import oci

    return oci


def parse_mirror(spec: str, where: str = "mirrors") -> Mirror:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{where}: a mirror must be a non-empty string")
    spec = spec.strip()
    scheme = urlsplit(spec).scheme.lower()
    if scheme == "oci":
        try:
            _oci().OciRef.parse(spec)
        except PylmservError as exc:
            raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
        return Mirror(spec, "oci")
    if scheme in ("http", "https", "file"):
        if urlsplit(spec).query or urlsplit(spec).fragment:
            raise ConfigError(f"{where}: a mirror base URL takes no query or fragment: {redact(spec)}")
        return Mirror(spec, "http")
    raise ConfigError(f"{where}: unsupported mirror {redact(spec)!r}",
                      hint="Use http(s)://BASE or file:///BASE (BASE/sha256/HEX), or oci://HOST[:PORT]/REPO.")


def configured(config_mirrors: Sequence[str] = (), env=None) -> List[Mirror]:
    """The mirror list: $PYLMSERV_MIRRORS when set (space-separated), else the config's."""
    env = os.environ if env is None else env
    if MIRRORS_ENV in env:
        return [parse_mirror(s, MIRRORS_ENV) for s in env[MIRRORS_ENV].split()]
    return [parse_mirror(s, "mirrors in pylmserv.toml") for s in config_mirrors]


def _tmp_for(tmp_dir: Path, mirror: Mirror) -> Path:
    """Each source resumes in its own directory: a mirror's partial never mixes with the origin's."""
    key = hashlib.sha256(mirror.spec.encode()).hexdigest()[:16]
    path = Path(tmp_dir) / "mirrors" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_verified(origin: str, dest: Path, expected: Optional[Hash], size: Optional[int], *,
                   mirrors: Sequence[Mirror] = (), tmp_dir: Path, offline: bool = False,
                   origin_headers: Optional[dict] = None, connections: int = 8, progress: bool = True,
                   stall_limit: Optional[float] = None,
                   on_progress: Optional[Callable[[int, Optional[int]], None]] = None) -> DownloadResult:
    """Put the file `expected` (sha256, `size`) at `dest`: from the first mirror that has it,
    else from `origin`; every source checked. Without `expected` only the origin is asked
    (nothing else can be checked). `offline`: file:// mirrors only, and no origin."""
    sources: List[Mirror] = list(mirrors) if expected is not None else []
    if offline:
        sources = offline_sources(sources, expected)
    failures: List[str] = []
    lied = False
    for mirror in sources:
        started = time.monotonic()
        try:
            if mirror.kind == "oci":
                result = _pull_oci(mirror, expected, size, dest, tmp_dir, progress, on_progress,
                                   resolve_stall_limit(stall_limit))
            else:
                result = download(mirror.blob_url(expected), dest, expected=expected, size=size,
                                  connections=connections, progress=progress, tmp_dir=_tmp_for(tmp_dir, mirror),
                                  stall_limit=stall_limit, on_progress=on_progress)
            log.info("%s: from mirror %s", expected.hex[:12], mirror)
            _drop_partials(sources, expected, tmp_dir)
            return result
        except DiskSpaceError:
            raise
        except VerificationError as exc:
            lied = True
            unlink_missing_ok(dest)
            log.warning("mirror %s sent other bytes than the lock names for sha256 %s; skipped, nothing it sent "
                        "was kept (%s)", mirror, expected.hex, exc.message)
            failures.append(f"mirror {mirror} (other bytes)")
        except PylmservError as exc:
            unlink_missing_ok(dest)
            log.info("mirror %s: %s (after %.1fs); trying the next source", mirror, exc.message,
                     time.monotonic() - started)
            failures.append(f"mirror {mirror} ({_reason(exc)})")
    if offline:
        raise NetworkError(f"{dest.name}: not in the store; offline, "
                           + ("and no file:// mirror had it: " + "; ".join(failures) if failures
                              else "and no file:// mirror is configured"),
                           hint="Run without --offline / PYLMSERV_OFFLINE once, or import a bundle "
                                "(`pylmserv import FILE`).")
    if not origin:
        raise NetworkError(f"{dest.name}: no source left: " + "; ".join(failures or ["no origin URL"]))
    try:
        result = download(origin, dest, expected=expected, size=size, connections=connections,
                          headers=origin_headers, progress=progress, tmp_dir=tmp_dir, stall_limit=stall_limit,
                          on_progress=on_progress)
        if expected is not None:
            _drop_partials(sources, expected, tmp_dir)
        return result
    except DiskSpaceError:
        raise
    except PylmservError as exc:
        if not failures:
            raise
        failures.append(f"origin {redact(origin)} ({_reason(exc)})")
        what = f"sha256 {expected.hex}" if expected is not None else redact(origin)
        raise PylmservError(f"{dest.name} ({what}): every source failed: " + "; ".join(failures),
                            hint="Nothing was kept. Check the mirrors and the network"
                                 + ("; a mirror named as sending other bytes holds wrong data." if lied else "."),
                            exit_code=exc.exit_code) from None  # the origin's verdict: 3 network, 4 other bytes


def _drop_partials(sources: Sequence[Mirror], expected: Hash, tmp_dir: Path) -> None:
    """The file is in hand: what a registry left for a resume of it is no longer needed."""
    for mirror in sources:
        if mirror.kind == "oci":
            unlink_missing_ok(_tmp_for(tmp_dir, mirror) / f"{expected.hex}.part")


def _reason(exc: PylmservError) -> str:
    msg = exc.message
    if isinstance(exc, VerificationError):
        return "other bytes"
    for marker in ("HTTP ", "[Errno"):
        i = msg.find(marker)
        if i >= 0:
            return msg[i:i + 80].split(" from ")[0].rstrip(")")
    return msg[:120]


def _pull_oci(mirror: Mirror, expected: Hash, size: Optional[int], dest: Path, tmp_dir: Path, progress: bool,
              on_progress, stall_limit: float) -> DownloadResult:
    started = time.monotonic()
    partial = _tmp_for(tmp_dir, mirror) / f"{expected.hex}.part"  # kept across runs: the next one resumes
    oci = _oci()
    # one stream: a silent read is a stall
    client = oci.Registry(oci.OciRef.parse(mirror.spec), read_timeout=stall_limit)
    bar = Progress(dest.name, size, enabled=progress, callback=on_progress)
    try:
        received = client.pull_blob(expected, partial, size=size, on_progress=bar.update)
    finally:
        bar.close()
        client.close()
    got_size = partial.stat().st_size
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, dest)
    return DownloadResult(path=dest, sha256=expected, size=got_size, bytes_downloaded=received,
                          seconds=time.monotonic() - started)


def offline_sources(mirrors: Sequence[Mirror], expected: Optional[Hash]) -> List[Mirror]:
    """The mirrors an offline fetch may ask for `expected`: file:// ones (no network)."""
    if expected is None:
        return []
    return [m for m in mirrors if m.kind == "http" and urlsplit(m.spec).scheme == "file"]
