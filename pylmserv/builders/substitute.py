"""Shared builds: compile once, substitute everywhere, trusted by signature.

A portable build is named by its cache key (the sha256 of its cache inputs: the build
key's inputs less what only the builder's host knows, see LlamaCppBuild.cache_inputs). A
pushed build is a manifest - the key, the inputs, and every shipped file's name, size and
sha256 - signed (ed25519, Nix's key format) over a fingerprint of the whole manifest:

    pylmserv-build;1;<key>;<sha256 hex of the manifest's canonical JSON, signatures left out>

A substitute is installed only when (1) the manifest is for the asked key and its inputs
hash to that key, (2) a key in trusted-public-keys signed that fingerprint, (3) the builder's
C library is not newer than this host's, and (4) every file's bytes have the signed sha256.
Any failure is refused with one line saying which; nothing of it is installed. Accepted
files become the build's outputs through the skeleton's own stamp and install (base.py),
so `current`, stamps, `list` and `gc` see a substituted build as any other.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

from ..core.errors import PylmservError, UsageError, VerificationError
from ..core.log import get_logger
from ..core.signing import PublicKey, SecretKey, check_signatures, parse_public_keys
from ..store import records as stamps
from ..store.installs import shared_libs
from ..transfer.buildcache import open_cache

log = get_logger("pylmserv.build")

SCHEMA = "pylmserv-build/1"
FINGERPRINT = "pylmserv-build;1;"
SUBSTITUTERS_ENV = "PYLMSERV_SUBSTITUTERS"
TRUSTED_KEYS_ENV = "PYLMSERV_TRUSTED_KEYS"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def cache_key(cache_inputs: Mapping) -> str:
    """Full sha256 hex: a shared cache needs no short names."""
    return hashlib.sha256(canonical(dict(cache_inputs))).hexdigest()


def libc() -> Tuple[str, str]:
    """(family, version) of this host's C library: ("glibc", "2.36"); ("", "") when unknown."""
    import platform  # lazy: only substitutions and pushes ask

    family, version = platform.libc_ver()
    return family or "", version or ""


def fingerprint(manifest: Mapping) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signatures"}
    return (FINGERPRINT + str(manifest.get("key")) + ";" + hashlib.sha256(canonical(body)).hexdigest()).encode()


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or ""))


# -- settings: which substituters, which keys ---------------------------------------------

def settings(cache_config: Optional[Mapping]) -> Tuple[List[str], List[PublicKey]]:
    """Substituter URLs and trusted keys: PYLMSERV_SUBSTITUTERS / PYLMSERV_TRUSTED_KEYS
    (space-separated) when set, else [cache] substituters / trusted-public-keys."""
    cfg = dict(cache_config or {})
    env_subs = os.environ.get(SUBSTITUTERS_ENV)
    subs = env_subs.split() if env_subs is not None else list(cfg.get("substituters", []))
    env_keys = os.environ.get(TRUSTED_KEYS_ENV)
    try:
        keys = parse_public_keys(env_keys.split() if env_keys is not None else cfg.get("trusted-public-keys", []))
    except UsageError as exc:
        where = TRUSTED_KEYS_ENV if env_keys is not None else "[cache] trusted-public-keys"
        raise UsageError(f"{where}: {exc.message}", hint=exc.hint) from None
    return subs, keys


# -- the manifest -------------------------------------------------------------------------

def make_manifest(key: str, inputs: Mapping, engine: str, backend: str, files: Sequence[dict],
                  built_with: Mapping) -> dict:
    return {"schema": SCHEMA, "key": key, "engine": engine, "backend": backend, "inputs": dict(inputs),
            "files": sorted((dict(f) for f in files), key=lambda f: f["name"]), "built_with": dict(built_with),
            "signatures": []}


def sign_manifest(manifest: dict, key: SecretKey) -> dict:
    signed = dict(manifest)
    signed["signatures"] = sorted(set(manifest.get("signatures", [])) | {str(key.sign(fingerprint(manifest)))})
    return signed


def check_manifest(body: bytes, key: str, trusted: Sequence[PublicKey], wanted: Sequence[str]) -> Tuple[dict, PublicKey]:
    """The manifest and the key that signed it, or VerificationError saying what is wrong."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise VerificationError("the manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise VerificationError(f"not a {SCHEMA} manifest")
    if doc.get("key") != key or not isinstance(doc.get("inputs"), dict) or cache_key(doc["inputs"]) != key:
        raise VerificationError(f"the manifest is for another build than key {key}")
    if not trusted:
        raise VerificationError("no trusted-public-keys are configured: nothing can be trusted")
    sigs = doc.get("signatures")
    if not isinstance(sigs, list) or not all(isinstance(s, str) for s in sigs):
        raise VerificationError("malformed signatures")
    signer = check_signatures(sigs, trusted, fingerprint(doc))
    # signed from here on: still checked, as a signer's mistake must not write outside the build
    files = doc.get("files")
    if not isinstance(files, list) or not files:
        raise VerificationError("the manifest lists no files")
    names = set()
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not _NAME.fullmatch(f["name"]) \
                or not re.fullmatch(r"[0-9a-f]{64}", str(f.get("sha256"))) or not isinstance(f.get("size"), int) \
                or f["size"] < 0 or f["name"] in names \
                or not isinstance(f.get("target", ""), str) or not isinstance(f.get("executable", False), bool):
            raise VerificationError(f"bad file entry in the manifest: {str(f)[:120]}")
        names.add(f["name"])
    targets = {f.get("target") for f in files if f.get("target")}
    missing = [t for t in wanted if t not in targets]
    if missing:
        raise VerificationError(f"the substitute lacks {', '.join(missing)}")
    return doc, signer


def check_libc(doc: Mapping) -> None:
    theirs = dict(doc.get("built_with") or {}).get("libc") or ["", ""]
    mine = libc()
    if theirs[0] and mine[0] == theirs[0] and _version_tuple(theirs[1]) > _version_tuple(mine[1]):
        raise VerificationError(f"built against {theirs[0]} {theirs[1]}, newer than this host's {mine[1]}")


# -- substitution -------------------------------------------------------------------------

def substitute(build, cache_inputs: Mapping, cache_config: Optional[Mapping]):
    """Try each substituter for `build` (a BuildSkeleton); the installed BuildResult, or None
    (each refusal logged as one line). Runs under the build's lock."""
    subs, trusted = settings(cache_config)
    if not subs:
        return None
    key = cache_key(cache_inputs)
    wanted = list(build.wanted() or ())
    build.refusals = []
    for url in subs:
        try:
            cache = open_cache(url)
            body = cache.get_manifest(key)
            if body is None:
                log.info("substituter %s: no build %s", cache, key[:16])
                continue
            doc, signer = check_manifest(body, key, trusted, wanted)
            check_libc(doc)
            t0 = time.monotonic()
            result = _install(build, cache, doc, signer)
            log.warning("%s (%s): substituted from %s in %.1f s, signed by %s", build.engine, build.backend, cache,
                        time.monotonic() - t0, signer.name)
            return result
        except PylmservError as exc:
            line = f"substituter {url}: refused build {key[:16]}: {exc.message}"
            build.refusals.append(line)
            log.warning("%s", line)
    return None


def _install(build, cache, doc: dict, signer: PublicKey):
    """Download every file into a staging dir beside the build's bin/, each checked against
    its signed sha256; only when all match does staging become bin/ and the stamp is written."""
    import shutil

    staging = build.build_dir / f".substitute-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "bin").mkdir(parents=True)
    try:
        fetched: dict = {}  # sha256 -> first file with those bytes (libfoo.so, .so.0, .so.0.1.2)
        for f in doc["files"]:
            dest = staging / "bin" / f["name"]
            first = fetched.get((f["sha256"], f["size"]))
            if first is not None:
                shutil.copyfile(first, dest)  # checked when it arrived: one download per content
            else:
                cache.get_blob(f["sha256"], dest, f["size"], what=f"{f['name']} from {cache}")
                fetched[(f["sha256"], f["size"])] = dest
            os.chmod(dest, 0o755 if f.get("executable") else 0o644)
        stamps.remove_stamp(build.stamp_path)
        old = build.build_dir / "bin"
        if old.exists():
            aside = build.build_dir / f".bin-old-{os.getpid()}"
            os.replace(old, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(staging / "bin", old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    outputs = {f["target"]: build.build_dir / "bin" / f["name"] for f in doc["files"] if f.get("target")}
    digests = {f["name"]: f["sha256"] for f in doc["files"]}
    stamp = stamps.make_stamp(build.inputs, outputs, extra={
        "commands": [], "sha256": digests,
        "substituted": {"from": str(cache), "cache_key": doc["key"], "signed_by": signer.name,
                        "built_with": doc.get("built_with", {})}})
    stamps.write_stamp(build.stamp_path, stamp)
    note = f"substituted from {cache} (signed by {signer.name}); nothing compiled"
    return build.finish(stamp.output_paths(), cache_hit=False, notes=(note,), sha256=digests)


# -- push ---------------------------------------------------------------------------------

def files_of(stamp, select: Sequence[str]) -> List[dict]:
    """The files a stamped build ships: its outputs (by target) and the libraries beside them,
    each hashed now and checked against what the stamp recorded at build time."""
    outputs = {t: Path(stamp.outputs[t].path) for t in select}
    libs_parent = next(iter(outputs.values())).parent.parent
    recorded = dict(stamp.extra.get("sha256") or {})
    out = []
    entries = [(t, p) for t, p in sorted(outputs.items())] + [(None, p) for p in shared_libs(libs_parent)]
    for target, path in entries:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if recorded and recorded.get(path.name) != h.hexdigest():
            raise VerificationError(f"{path} changed since it was built (sha256 {h.hexdigest()}, stamp says "
                                    f"{recorded.get(path.name)})", hint="Rebuild it (`pylmserv build --force`), then push.")
        entry = {"name": path.name, "sha256": h.hexdigest(), "size": path.stat().st_size,
                 "executable": os.access(path, os.X_OK), "path": str(path)}
        if target:
            entry["target"] = target
        out.append(entry)
    return out


def push(cache, key: str, cache_inputs: Mapping, stamp, engine: str, backend: str, targets: Sequence[str],
         sign_key: SecretKey) -> dict:
    """Upload a stamped build's files (blobs first, then the signed manifest)."""
    files = files_of(stamp, targets)
    sent = set()
    for f in files:
        path = Path(f.pop("path"))
        if f["sha256"] not in sent:  # versioned library links share their bytes: one blob
            cache.put_blob(f["sha256"], path)
            sent.add(f["sha256"])
    family, version = libc()
    manifest = make_manifest(key, cache_inputs, engine, backend, files, {
        "libc": [family, version], "seconds": round(stamp.seconds, 1),
        "toolchain": list(stamp.extra.get("toolchain") or [])})
    manifest = sign_manifest(manifest, sign_key)
    cache.put_manifest(key, json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
    return dict(manifest, signed_by=sign_key.name)
