"""[sources.NAME] type = "url" (flat file, or unpack = true: NAR of the unpacked archive)
and [models.NAME] url = ... (flat, with the rest of a GGUF split set as shards). A
published sha256 in the config must match."""
from __future__ import annotations

from urllib.parse import quote

from ...core.errors import VerificationError
from ...core.gguf import split_names
from ..drift import reusable
from ..lock import ArchivePin, FilePin, LockEntry, Shard
from . import hash_fetch
from .base import Fetch
from .git import _meta


def resolve(spec, locked, opts) -> LockEntry:
    cls = ArchivePin if spec.unpack else FilePin
    common = dict(kind="sources", name=spec.name, url=spec.url, **_meta(spec))
    if reusable(locked, cls, opts.refresh, url=spec.url):
        return cls(hash=locked.hash, size=locked.size, **common)
    got = hash_fetch(Fetch("archive" if spec.unpack else "file", spec.url, spec.name), opts)
    check_published(spec.name, spec.url, spec.sha256 if not spec.unpack else None, got.hash)
    return cls(hash=got.hash, size=got.size, **common)


def resolve_model(spec, locked, opts) -> LockEntry:
    filename = spec.filename
    names = split_names(filename)
    if reusable(locked, FilePin, opts.refresh, url=spec.url) and len(locked.shards) == len(names) - 1:
        return locked
    got = hash_fetch(Fetch("file", spec.url, spec.name), opts)
    check_published(spec.name, spec.url, spec.sha256, got.hash)
    if spec.size is not None and got.size is not None and spec.size != got.size:
        raise VerificationError(f"{spec.name}: {spec.url} has {got.size} bytes, the config says {spec.size}",
                                hint="Fix size in pylmserv.toml if the file changed on purpose.")
    # The other files of a split set sit beside the first one (same directory URL).
    base = spec.url.split("?", 1)[0].rsplit("/", 1)[0]
    shards = []
    for n in (n for n in names if n != filename):
        url = f"{base}/{quote(n)}"
        h = hash_fetch(Fetch("file", url, f"{spec.name} ({n})"), opts)
        shards.append(Shard(n, url, h.hash, h.size))
    return FilePin(kind="models", name=spec.name, url=spec.url, hash=got.hash, size=got.size, shards=tuple(shards))


def check_published(name: str, url: str, published, got) -> None:
    if published is not None and published != got:
        raise VerificationError(f"{name}: {url} hashes to {got.sri}, but pylmserv.toml pins {published.sri}",
                                hint="The upstream file changed or the pin is wrong; fix sha256 in pylmserv.toml.")
