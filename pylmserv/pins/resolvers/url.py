"""[sources.NAME] type = "url" (flat file, or unpack = true: NAR of the unpacked archive)
and [models.NAME] url = ... (flat). A published sha256 in the config must match."""
from __future__ import annotations

from ..config import LockEntry
from ...core.errors import VerificationError
from . import hash_fetch
from .base import Fetch, same_pin
from .git import _meta


def resolve(spec, locked, opts) -> LockEntry:
    mode = spec.mode
    ident = {"type": "url", "unpack": spec.unpack}
    extra = dict(ident, **_meta(spec))
    if same_pin(locked, spec.url, mode, None, ident, opts):
        return LockEntry("sources", spec.name, spec.url, locked.hash, mode, size=locked.size, extra=extra)
    got = hash_fetch(Fetch("archive" if spec.unpack else "file", spec.url, spec.name), opts)
    check_published(spec.name, spec.url, spec.sha256 if not spec.unpack else None, got.hash)
    return LockEntry("sources", spec.name, spec.url, got.hash, mode, size=got.size, extra=extra)


def resolve_model(spec, locked, opts) -> LockEntry:
    if same_pin(locked, spec.url, "flat", None, {}, opts):
        return LockEntry("models", spec.name, spec.url, locked.hash, "flat", size=locked.size)
    got = hash_fetch(Fetch("file", spec.url, spec.name), opts)
    check_published(spec.name, spec.url, spec.sha256, got.hash)
    if spec.size is not None and got.size is not None and spec.size != got.size:
        raise VerificationError(f"{spec.name}: {spec.url} has {got.size} bytes, the config says {spec.size}",
                                hint="Fix size in pylmserv.toml if the file changed on purpose.")
    return LockEntry("models", spec.name, spec.url, got.hash, "flat", size=got.size)


def check_published(name: str, url: str, published, got) -> None:
    if published is not None and published != got:
        raise VerificationError(f"{name}: {url} hashes to {got.sri}, but pylmserv.toml pins {published.sri}",
                                hint="The upstream file changed or the pin is wrong; fix sha256 in pylmserv.toml.")
