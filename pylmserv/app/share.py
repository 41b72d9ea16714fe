"""Share locked models: push to an OCI registry, export an OCI image layout archive (a bundle
for a machine without a network), import one. The library behind `pylmserv push`,
`export` and `import`.

Every model is one OCI artifact in the CNCF ModelPack format (github.com/modelpack/model-spec,
specs-go/v1/mediatype.go and docs/config.md / schema/config-schema.json):

  manifest   application/vnd.oci.image.manifest.v1+json,
             artifactType application/vnd.cncf.model.manifest.v1+json
  config     application/vnd.cncf.model.config.v1+json:
             {"descriptor": {"name": NAME}, "config": {"format": "gguf"},
              "modelfs": {"type": "layers", "diffIds": [sha256:...]}}
  layers     application/vnd.cncf.model.weight.v1.raw, one per file (shard order), raw:
             the layer digest is the GGUF's own sha256, which the lock pins, so an
             oci:// mirror pulls it by the lock's hash. Layer annotations:
             org.cncf.model.filepath (ModelPack) and org.opencontainers.image.title.
  annotations on the manifest: org.opencontainers.image.title = NAME,
             dev.pylmserv.lock.entry = the model's lock entry as JSON (what import checks
             the files against, and what a reader needs to pin the same bytes).

Layout on a registry: one repository holds many models (their blobs are shared by digest),
each under the tag NAME; `oci://HOST/REPO` as a mirror needs no tag at all. An export is
the same artifacts in an OCI image layout (oci-layout, index.json with one manifest per
model, org.opencontainers.image.ref.name = NAME; blobs/sha256/HEX) inside a tar:
`skopeo copy oci-archive:FILE:NAME docker://HOST/REPO:NAME` puts one into any registry.

The manifests carry no timestamps, so pushing or exporting the same lock twice gives the
same digests.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.errors import UsageError, VerificationError
from ..core.fsutil import fsync_dir, unlink_missing_ok
from ..core.hashing import Hash
from ..core.log import get_logger
from ..core.names import show
from ..core.progress import Progress
from ..pins.config import Project, load_project
from ..pins.lock import LockEntry
from ..store import blobs as store
from ..transfer import oci

log = get_logger("pylmserv.share")

ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_TYPE = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
LOCK_ANNOTATION = "dev.pylmserv.lock.entry"
LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
MAX_JSON = 4 << 20


@dataclass(frozen=True)
class ModelFile:
    filename: str
    sha256: Hash
    size: int
    path: Path  # the blob in the store


@dataclass(frozen=True)
class Artifact:
    name: str
    files: Tuple[ModelFile, ...]
    config: bytes
    manifest: bytes

    @property
    def digest(self) -> Hash:
        return _sha(self.manifest)

    @property
    def config_digest(self) -> Hash:
        return _sha(self.config)


def _sha(data: bytes) -> Hash:
    return Hash("sha256", hashlib.sha256(data).digest())


def _canon(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _filename(entry: LockEntry) -> str:
    from urllib.parse import unquote, urlsplit

    ref = getattr(entry, "file", None) or entry.url
    return unquote(urlsplit(ref).path.rstrip("/").rsplit("/", 1)[-1]) or entry.name


def _check_filename(name: str, filename: str) -> str:
    if filename in ("", ".", "..") or "/" in filename or "\\" in filename or filename.startswith(".") \
            or re.search(r"[\x00-\x1f\x7f]", filename):
        raise VerificationError(f"{name}: refusing a file named {show(repr(filename))}")
    return filename


def artifact(project: Project, name: str, home: Optional[Path] = None) -> Artifact:
    """The ModelPack artifact of locked model `name`, from the files in the store."""
    entry = project.lock.models.get(name)
    if entry is None:
        raise UsageError(f"{name!r} is not a model in the lock",
                         hint="Pin it first (`pylmserv prefetch NAME`); push and export share locked models.")
    if entry.mode != "flat":
        raise UsageError(f"models.{name}: only flat (file) pins can be shared, not {entry.mode!r}")
    files = [(_filename(entry), entry.hash, entry.size)]
    files += [(s.file.rsplit("/", 1)[-1], s.hash, s.size) for s in getattr(entry, "shards", ())]
    if any(f.lower().endswith((".zip", ".tar", ".tgz", ".tar.gz", ".tar.xz", ".tar.zst")) for f, _, _ in files):
        raise UsageError(f"{name}: archive models cannot be shared yet; only GGUF files")
    out = []
    for filename, h, size in files:
        _check_filename(name, filename)
        if not store.has_blob(h, home, size):
            raise UsageError(f"{name}: {filename} (sha256 {h.hex[:12]}...) is not in the store",
                             hint=f"Fetch it first: `pylmserv fetch {name}`.")
        path = store.blob_path(h, home)
        out.append(ModelFile(filename, h, path.stat().st_size, path))
    config = _canon({"descriptor": {"name": name},
                     "config": {"format": "gguf"},
                     "modelfs": {"type": "layers", "diffIds": [f"sha256:{f.sha256.hex}" for f in out]}})
    lock_entry = _canon({"kind": "models", "name": name, **entry.to_table()}).decode()
    manifest = _canon({
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": f"sha256:{_sha(config).hex}", "size": len(config)},
        "layers": [{"mediaType": WEIGHT_RAW, "digest": f"sha256:{f.sha256.hex}", "size": f.size,
                    "annotations": {FILEPATH: f.filename, TITLE: f.filename}} for f in out],
        "annotations": {TITLE: name, LOCK_ANNOTATION: lock_entry},
    })
    return Artifact(name, tuple(out), config, manifest)


def _project(names, config, lock) -> Project:
    if not names:
        raise UsageError("name at least one model", hint="Names: `pylmserv list`.")
    return load_project(config, lock)


# -- push ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pushed:
    name: str
    reference: str  # oci://HOST/REPO:NAME
    digest: Hash  # the manifest's
    uploaded: int  # bytes sent (blobs the registry lacked)
    seconds: float

    def to_json(self) -> dict:
        return {"name": self.name, "reference": self.reference, "digest": f"sha256:{self.digest.hex}",
                "uploaded": self.uploaded, "seconds": round(self.seconds, 3)}


def push(names: Sequence[str], to: str, *, config=None, lock=None, home=None, progress: bool = True,
         chunk_size: int = 0) -> List[Pushed]:
    """Push locked models (from the store) to `to` (oci://HOST[:PORT]/REPO), tag NAME each."""
    ref = oci.OciRef.parse(to)
    project = _project(names, config, lock)
    arts = [artifact(project, n, home) for n in names]  # refuse before sending anything
    client = oci.Registry(ref)
    results = []
    try:
        for art in arts:
            started = time.monotonic()
            sent = 0
            for f in art.files:
                bar = Progress(f"{art.name}: {f.filename}", f.size, enabled=progress)
                try:
                    if client.push_blob(f.path, f.sha256, f.size, chunk_size=chunk_size, on_progress=bar.update):
                        sent += f.size
                    else:
                        log.info("%s: %s already in %s", art.name, f.filename, ref)
                finally:
                    bar.close()
            tmp = store.temp_path("config.json", home)
            try:
                tmp.write_bytes(art.config)
                client.push_blob(tmp, art.config_digest, len(art.config))
            finally:
                unlink_missing_ok(tmp)
            digest = client.put_manifest(art.name, art.manifest, oci.OCI_MANIFEST)
            log.info("%s: pushed %s:%s (sha256:%s)", art.name, ref, art.name, digest.hex)
            results.append(Pushed(art.name, f"{ref}:{art.name}", digest, sent, time.monotonic() - started))
    finally:
        client.close()
    return results


# -- export ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Exported:
    path: Path
    names: Tuple[str, ...]
    size: int

    def to_json(self) -> dict:
        return {"path": str(self.path), "names": list(self.names), "size": self.size}


def export(names: Sequence[str], out: Path, *, config=None, lock=None, home=None) -> Exported:
    """Write the models as an OCI image layout tar at `out` (atomically; streamed)."""
    project = _project(names, config, lock)
    arts = [artifact(project, n, home) for n in dict.fromkeys(names)]
    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} is not a directory", hint="Create it, or name another output file.")
    if out.is_dir():
        raise UsageError(f"{out} is a directory", hint="Name the archive file to write, e.g. -o models.oci.tar.")
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
             "manifests": [{"mediaType": oci.OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
                            "digest": f"sha256:{a.digest.hex}", "size": len(a.manifest),
                            "annotations": {REF_NAME: a.name}} for a in arts]}
    small: Dict[str, bytes] = {}
    big: Dict[str, ModelFile] = {}
    for a in arts:
        small[a.digest.hex] = a.manifest
        small[a.config_digest.hex] = a.config
        for f in a.files:
            big[f.sha256.hex] = f
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", LAYOUT)
            _add_dir(tar, "blobs")
            _add_dir(tar, "blobs/sha256")
            for hexd, data in sorted(small.items()):
                _add_bytes(tar, f"blobs/sha256/{hexd}", data)
            for hexd, f in sorted(big.items()):
                info = _info(f"blobs/sha256/{hexd}", f.size)
                with open(f.path, "rb") as src:
                    tar.addfile(info, src)  # copies in blocks: memory stays flat
            _add_bytes(tar, "index.json", _canon(index))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        unlink_missing_ok(tmp)
        raise
    return Exported(out, tuple(a.name for a in arts), out.stat().st_size)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o444, 0, "", ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    tar.addfile(_info(name, len(data)), io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
    tar.addfile(info)


# -- import ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Imported:
    name: str
    path: Path
    size: int
    sha256: Hash

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "size": self.size, "sha256": self.sha256.hex}


_MEMBER = re.compile(r"^(?:\./)?(oci-layout|index\.json|blobs/?|blobs/sha256/?|blobs/sha256/([0-9a-f]{64}))$")


def import_bundle(path: Path, *, home=None, progress: bool = True) -> List[Imported]:
    """Install the models of an OCI image layout tar (what `export` writes, or skopeo's
    oci-archive) into the store: no network; every blob is hashed as it is read and must
    match its name; the manifests must be ModelPack artifacts whose layers are all there;
    nothing enters the store unless the whole bundle checks out."""
    path = Path(path)
    home = store.root(home)
    # named as gc knows a live process's staging (.PID.HEX.tmp): a gc meanwhile leaves it alone
    staging = store.tmp_dir(home) / f"import.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        small, blobs = _read_bundle(path, staging, progress)
        models = _check_layout(path, small, blobs)
        results = []
        for name, files in models:
            for filename, h, size in files:
                if not store.has_blob(h, home, size):
                    with store.blob_lock(h, home):
                        staged = blobs[h.hex][0]
                        if staged.exists():
                            store.install_blob(staged, h, home)
            linked = [store.link_named(name, h, filename, home=home) for filename, h, _ in files]
            if len(files) > 1:
                store.set_order(name, [filename for filename, _, _ in files], home=home)
            results.append(Imported(name, linked[0], sum(s for _, _, s in files), files[0][1]))
            log.info("%s: imported %s (%d file(s))", name, linked[0], len(files))
        return results
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _refuse(path: Path, why: str) -> VerificationError:
    return VerificationError(f"{path}: not a usable bundle: {why}; nothing was imported",
                             hint="Export it again (`pylmserv export NAME... -o FILE`) and copy it whole.")


def _read_bundle(path: Path, staging: Path, progress: bool):
    small: Dict[str, bytes] = {}
    blobs: Dict[str, Tuple[Path, int]] = {}
    try:
        tar = tarfile.open(path, mode="r|*")  # a stream: one pass, flat memory
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _refuse(path, f"not a tar archive ({exc})") from None
    bar = Progress(path.name, path.stat().st_size, enabled=progress)
    try:
        with tar:
            for member in tar:
                m = _MEMBER.match(member.name)
                if m is None:
                    raise _refuse(path, f"unexpected member {show(repr(member.name))}")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise _refuse(path, f"{show(repr(member.name))} is not a regular file")
                hexd = m.group(2)
                src = tar.extractfile(member)
                if hexd is None:
                    if member.size > MAX_JSON:
                        raise _refuse(path, f"{member.name} is too large")
                    small[m.group(1)] = src.read()
                    continue
                if hexd in blobs or hexd in small:
                    raise _refuse(path, f"blob {hexd} appears twice")
                h = hashlib.sha256()
                dest = staging / hexd
                got = 0
                with open(dest, "wb") as out:
                    while True:
                        block = src.read(1 << 20)
                        if not block:
                            break
                        h.update(block)
                        out.write(block)
                        got += len(block)
                        bar.update(len(block))
                if got != member.size:
                    raise _refuse(path, f"blob {hexd} is cut short ({got} of {member.size} bytes)")
                if h.hexdigest() != hexd:
                    raise _refuse(path, f"blob {hexd} holds other bytes (sha256 {h.hexdigest()})")
                if member.size <= 1 << 20:  # manifests and configs are small; weights are not kept in memory
                    small[hexd] = dest.read_bytes()
                blobs[hexd] = (dest, got)
    except (tarfile.TarError, EOFError, zlib_error()) as exc:
        raise _refuse(path, f"damaged archive ({type(exc).__name__}: {exc})") from None
    finally:
        bar.close()
    return small, blobs


def zlib_error():
    import zlib

    return zlib.error


def _json(path: Path, data: Optional[bytes], what: str):
    if data is None:
        raise _refuse(path, f"{what} is missing")
    try:
        return json.loads(data)
    except ValueError:
        raise _refuse(path, f"{what} is not JSON") from None


def _check_layout(path: Path, small: Dict[str, bytes], blobs) -> List[Tuple[str, List[Tuple[str, Hash, int]]]]:
    layout = _json(path, small.get("oci-layout"), "oci-layout")
    if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
        raise _refuse(path, "oci-layout is not version 1.0.0")
    index = _json(path, small.get("index.json"), "index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise _refuse(path, "index.json lists no manifests")
    models = []
    for desc in manifests:
        hexd = _desc_hex(path, desc)
        if hexd not in blobs or blobs[hexd][1] != desc.get("size"):
            raise _refuse(path, f"manifest {hexd} is missing or of another size")
        manifest = _json(path, small.get(hexd), f"manifest {hexd}")
        if manifest.get("artifactType") != ARTIFACT_TYPE or manifest.get("config", {}).get("mediaType") != CONFIG_TYPE:
            raise _refuse(path, f"manifest {hexd} is not a ModelPack model")
        ann = manifest.get("annotations") or {}
        name = ann.get(TITLE) or (desc.get("annotations") or {}).get(REF_NAME)
        try:
            entry = json.loads(ann.get(LOCK_ANNOTATION, "{}"))
        except ValueError:
            entry = {}
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}$", name):
            raise _refuse(path, f"manifest {hexd} names no valid model")
        chex = _desc_hex(path, manifest.get("config"))
        if chex not in blobs or blobs[chex][1] != manifest["config"].get("size"):
            raise _refuse(path, f"{name}: the config blob is missing")
        cfg = _json(path, small.get(chex), f"{name}: config")
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not layers:
            raise _refuse(path, f"{name}: no layers")
        files = []
        for layer in layers:
            lhex = _desc_hex(path, layer)
            if layer.get("mediaType") != WEIGHT_RAW:
                raise _refuse(path, f"{name}: layer {lhex} is not a raw weight layer")
            if lhex not in blobs or blobs[lhex][1] != layer.get("size"):
                raise _refuse(path, f"{name}: layer {lhex} is missing or of another size")
            filename = (layer.get("annotations") or {}).get(FILEPATH)
            try:
                _check_filename(name, filename if isinstance(filename, str) else "")
            except VerificationError:
                raise _refuse(path, f"{name}: layer {lhex} has no usable file name") from None
            files.append((filename, Hash("sha256", bytes.fromhex(lhex)), layer["size"]))
        diff_ids = (cfg.get("modelfs") or {}).get("diffIds") if isinstance(cfg, dict) else None
        if diff_ids != [f"sha256:{h.hex}" for _, h, _ in files]:
            raise _refuse(path, f"{name}: the config's diffIds do not match the layers")
        if entry and (entry.get("hash") != files[0][1].sri or entry.get("name") != name):
            raise _refuse(path, f"{name}: the lock entry it carries names other bytes")
        models.append((name, files))
    return models


def _desc_hex(path: Path, desc) -> str:
    digest = desc.get("digest") if isinstance(desc, dict) else None
    m = re.match(r"^sha256:([0-9a-f]{64})$", digest or "")
    if m is None:
        raise _refuse(path, f"a descriptor with digest {show(repr(digest))}")
    return m.group(1)
