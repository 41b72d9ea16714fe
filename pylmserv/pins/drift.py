"""Is the pin still current? One comparator for prefetch (reuse or refetch), prefetch
--check (locked vs. recomputed), doctor and list (config vs. lock, no network)."""
from __future__ import annotations

import re
from typing import List, Optional

from .config import ModelSpec, SourceSpec
from .lock import ArchivePin, FilePin, GitPin, GithubPin, HfPin, LockEntry

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
PIN_FIELDS = ("hash", "rev", "url", "size")


def reusable(locked: Optional[LockEntry], cls: type, refresh: bool, **identity) -> bool:
    """True when `locked` already pins exactly this (same kind, same identity fields), so
    the resolver keeps its hash instead of fetching again."""
    if refresh or locked is None or type(locked) is not cls:
        return False
    return all(getattr(locked, k) == v for k, v in identity.items())


def pin_drift(locked: Optional[LockEntry], actual: LockEntry) -> List[str]:
    """Fields in which a freshly resolved pin differs from the lock ("missing": no pin)."""
    if locked is None:
        return ["missing"]
    out = [f for f in PIN_FIELDS if getattr(locked, f) != getattr(actual, f)
           and not (f == "size" and actual.size is None)]
    if type(locked) is not type(actual):
        out.insert(0, "type")
    elif getattr(locked, "shards", ()) != getattr(actual, "shards", ()):
        out.append("shards")
    return out


def config_drift(spec, pin: Optional[LockEntry]) -> List[str]:
    """How the lock's pin differs from what the config asks for, without the network
    (a branch or tag may have moved since: only prefetch --check can tell that)."""
    if pin is None:
        return ["not locked"]
    if isinstance(spec, SourceSpec):
        return _source_drift(spec, pin)
    if isinstance(spec, ModelSpec):
        return _model_drift(spec, pin)
    raise TypeError(spec)


def _ref_drift(ref: Optional[str], pin: LockEntry) -> List[str]:
    if ref and _COMMIT.match(ref) and pin.rev != ref:
        return [f"config ref {ref} but lock rev {pin.rev}"]
    locked_ref = getattr(pin, "ref", None)
    if locked_ref is not None and locked_ref != ref:
        return [f"config ref {ref} but lock ref {locked_ref}"]
    return []


def _source_drift(spec: SourceSpec, pin: LockEntry) -> List[str]:
    if spec.type == "github":
        if not isinstance(pin, GithubPin):
            return [f"config type github but lock type {pin.type}"]
        out = []
        if (pin.owner, pin.repo) != (spec.owner, spec.repo):
            out.append(f"config repo {spec.owner}/{spec.repo} but lock {pin.owner}/{pin.repo}")
        if pin.submodules != spec.submodules:
            out.append("config submodules differs from the lock")
        return out + _ref_drift(spec.ref, pin)
    if spec.type == "git":
        if not isinstance(pin, GitPin):
            return [f"config type git but lock type {pin.type}"]
        out = []
        if (pin.git_url or pin.url) != spec.url:
            out.append("config url differs from the lock")
        if pin.submodules != spec.submodules:
            out.append("config submodules differs from the lock")
        return out + _ref_drift(spec.ref, pin)
    want = ArchivePin if spec.unpack else FilePin
    if not isinstance(pin, want):
        return [f"config asks for a {want.TYPE} but the lock pins a {pin.type}"]
    out = []
    if spec.url != pin.url:
        out.append("config url differs from the lock")
    if spec.sha256 is not None and not spec.unpack and spec.sha256 != pin.hash:
        out.append("config sha256 differs from the lock")
    return out


def _model_drift(spec: ModelSpec, pin: LockEntry) -> List[str]:
    out = []
    if spec.hf:
        if not isinstance(pin, HfPin):
            return [f"config hf but lock type {pin.type}"]
        if (pin.hf, pin.file) != (spec.hf, spec.file):
            out.append("config hf/file differs from the lock")
        if _COMMIT.match(spec.revision) and pin.rev != spec.revision:
            out.append(f"config revision {spec.revision} but lock rev {pin.rev}")
        elif pin.revision is not None and pin.revision != spec.revision:
            out.append(f"config revision {spec.revision} but lock revision {pin.revision}")
    else:
        if not isinstance(pin, FilePin):
            return [f"config url but lock type {pin.type}"]
        if spec.url != pin.url:
            out.append("config url differs from the lock")
    if spec.sha256 is not None and spec.sha256 != pin.hash:
        out.append("config sha256 differs from the lock")
    if spec.size is not None and pin.size is not None and spec.size != pin.size:
        out.append(f"config size {spec.size} but lock size {pin.size}")
    return out
