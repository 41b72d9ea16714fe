"""Views of the store for other tools: the same inodes laid out where each tool looks.

  hf        HF_HUB_CACHE layout (huggingface_hub's file_download.py writes the same):
            models--ORG--REPO/blobs/<sha256>           the file (hard link to our blob)
            models--ORG--REPO/snapshots/<commit>/FILE  relative symlink -> ../../blobs/<sha256>
            models--ORG--REPO/refs/<branch>            the commit, when the pin asked a branch
  ollama    OLLAMA_MODELS layout (ollama's manifest/paths.go, manifest/manifest.go, layer.go,
            types/model/name.go, types/model/config.go):
            blobs/sha256-<hex>                         the GGUF (hard link), config, params, template
            manifests/registry.ollama.ai/library/NAME/latest   the manifest (schemaVersion 2)
  lmstudio  LM Studio's models folder: PUBLISHER/REPO/FILE (hard link)

Every view is made of hard links to our blobs (a symlink to the blob only where the
filesystem refuses a hard link), never a copy; the files a view needs beyond the model
(ollama's manifest and small JSON/template blobs, the Hub's refs) are written new. What a
view created is recorded in links.json under the home, so `link --remove` removes exactly
that (never a file the tool had already) and gc keeps a linked blob while its link exists.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..core.errors import UsageError
from ..core.fsutil import atomic_write_bytes, atomic_write_text
from ..core.hashing import Hash
from ..core.gguf import read_header
from . import adopt, layout
from .blobs import blob_path

LAYOUTS = ("hf", "ollama", "lmstudio")
STATE = "links.json"

# ollama's media types (server/images.go GetModel switch; manifest/manifest.go WriteManifest)
OLLAMA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OLLAMA_CONFIG = "application/vnd.docker.container.image.v1+json"
OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_TEMPLATE = "application/vnd.ollama.image.template"
OLLAMA_PARAMS = "application/vnd.ollama.image.params"
OLLAMA_HOST, OLLAMA_NAMESPACE, OLLAMA_TAG = "registry.ollama.ai", "library", "latest"
_OLLAMA_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}\Z")  # name.go isValidPart (model, tag)

# ollama templates are Go templates, not the GGUF's Jinja: the chat formats recognised in
# tokenizer.chat_template, written as ollama's own library writes them (.System/.Prompt).
_TEMPLATES = {
    "chatml": ("<|im_start|>",
               "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
               ["<|im_start|>", "<|im_end|>"]),
    "llama3": ("<|start_header_id|>",
               "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}


@dataclass(frozen=True)
class ViewFile:
    filename: str  # path inside the repo (hf) or the file's name
    hash: Hash
    size: int


@dataclass(frozen=True)
class Model:
    """What a view needs to know of a locked model."""

    name: str
    files: Tuple[ViewFile, ...]
    repo: Optional[str] = None  # org/repo on the Hub
    commit: Optional[str] = None
    revision: Optional[str] = None  # the branch the pin asked for, if any


@dataclass
class Made:
    """One path a view created: a link to blob `sha256` (hardlink/symlink) or a new file."""

    path: str
    how: str  # hardlink | symlink | file | dir
    sha256: Optional[str] = None

    def to_json(self) -> dict:
        return {"path": self.path, "how": self.how, "sha256": self.sha256}


@dataclass
class Link:
    name: str
    layout: str
    root: str
    made: List[Made] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)  # already there (the tool's own, or same bytes): left alone

    def to_json(self) -> dict:
        return {"name": self.name, "layout": self.layout, "root": self.root,
                "made": [m.to_json() for m in self.made], "kept": list(self.kept)}


def default_root(view: str, env=None) -> Path:
    if view == "hf":
        return adopt.hf_cache_dir(env)
    if view == "ollama":
        return adopt.ollama_dir(env)
    return adopt.lmstudio_dirs(env)[0]


# -- making links ---------------------------------------------------------------------------------

def _link(blob: Path, target: Path, link: Link, h: Hash) -> None:
    """Hard link `blob` at `target` (a symlink where the filesystem refuses); a file
    already there is left alone (if it is not the same inode it is the tool's own)."""
    if os.path.lexists(target):
        link.kept.append(str(target))
        return
    _mkdirs(target.parent, link)
    try:
        os.link(blob, target)
        link.made.append(Made(str(target), "hardlink", h.hex))
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        os.symlink(os.path.abspath(blob), target)
        link.made.append(Made(str(target), "symlink", h.hex))


def _mkdirs(directory: Path, link: Link) -> None:
    missing = []
    d = directory
    while not os.path.lexists(d):
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        d.mkdir()
        link.made.append(Made(str(d), "dir"))


def _write(target: Path, data: bytes, link: Link) -> None:
    if os.path.lexists(target):
        link.kept.append(str(target))
        return
    _mkdirs(target.parent, link)
    atomic_write_bytes(target, data)
    link.made.append(Made(str(target), "file", hashlib.sha256(data).hexdigest()))


def make(model: Model, view: str, root: Path, home: Path) -> Link:
    if view not in LAYOUTS:
        raise UsageError(f"unknown layout {view!r}", hint="Use one of: " + ", ".join(LAYOUTS))
    for f in model.files:
        if not blob_path(f.hash, home).is_file():
            raise UsageError(f"{model.name}: {f.filename} is not in the store",
                             hint=f"Run `pylmserv fetch {model.name}` first.")
    link = Link(model.name, view, str(root))
    try:
        {"hf": _hf, "ollama": _ollama, "lmstudio": _lmstudio}[view](model, Path(root), home, link)
    except BaseException:
        _undo(link)
        raise
    return link


def _hf(model: Model, root: Path, home: Path, link: Link) -> None:
    if not model.repo or not model.commit:
        raise UsageError(f"{model.name} is not a Hugging Face file (no repo and commit in its pin)",
                         hint="The hf layout needs an hf pin or a huggingface.co/ORG/REPO/resolve/COMMIT URL.")
    repo_dir = root / ("models--" + model.repo.replace("/", "--"))
    for f in model.files:
        blob = blob_path(f.hash, home)
        _link(blob, repo_dir / "blobs" / f.hash.hex, link, f.hash)
        snap = repo_dir / "snapshots" / model.commit / f.filename
        if not os.path.lexists(snap):
            _mkdirs(snap.parent, link)
            up = "/".join([".."] * (len(Path(f.filename).parts) + 1))
            os.symlink(f"{up}/blobs/{f.hash.hex}", snap)  # relative, as huggingface_hub links
            link.made.append(Made(str(snap), "symlink", f.hash.hex))
        else:
            link.kept.append(str(snap))
    if model.revision and model.revision != model.commit and "/" not in model.revision:
        _write(repo_dir / "refs" / model.revision, model.commit.encode(), link)


def _lmstudio(model: Model, root: Path, home: Path, link: Link) -> None:
    publisher, repo = model.repo.split("/", 1) if model.repo else ("pylmserv", model.name)
    for f in model.files:
        _link(blob_path(f.hash, home), root / publisher / repo / Path(f.filename).name, link, f.hash)


def ollama_metadata(gguf: Path) -> Tuple[dict, Optional[str], Optional[dict]]:
    """(config, Go template or None, params or None) for a GGUF, from its header."""
    header = read_header(gguf)
    arch = header.architecture or "llama"
    config = {"model_format": "gguf", "model_family": arch, "model_families": [arch], "model_type": "",
              "file_type": "", "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    chat = header.metadata.get("tokenizer.chat_template")
    if isinstance(chat, str):
        for marker, template, stops in _TEMPLATES.values():
            if marker in chat:
                return config, template, {"stop": stops}
    return config, None, None


def _blob_layer(root: Path, media: str, data: bytes, link: Link) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    _write(root / "blobs" / f"sha256-{digest}", data, link)
    return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}


def ollama_manifest_path(root: Path, name: str) -> Path:
    return root / "manifests" / OLLAMA_HOST / OLLAMA_NAMESPACE / name / OLLAMA_TAG


def _ollama(model: Model, root: Path, home: Path, link: Link) -> None:
    if len(model.files) != 1:
        raise UsageError(f"{model.name} is a {len(model.files)}-file split set; ollama loads one GGUF file",
                         hint="Link it with --layout hf or lmstudio, or merge it with llama-gguf-split --merge.")
    if not _OLLAMA_PART.match(model.name):
        raise UsageError(f"{model.name!r} is not a valid ollama model name (types/model/name.go)")
    [f] = model.files
    blob = blob_path(f.hash, home)
    config, template, params = ollama_metadata(blob)
    _link(blob, root / "blobs" / f"sha256-{f.hash.hex}", link, f.hash)
    layers = [{"mediaType": OLLAMA_MODEL, "digest": f"sha256:{f.hash.hex}", "size": f.size}]
    if template is not None:
        layers.append(_blob_layer(root, OLLAMA_TEMPLATE, template.encode(), link))
    if params is not None:
        layers.append(_blob_layer(root, OLLAMA_PARAMS, json.dumps(params).encode(), link))
    config["rootfs"]["diff_ids"] = [layer["digest"] for layer in layers]
    config_layer = _blob_layer(root, OLLAMA_CONFIG, json.dumps(config).encode(), link)
    manifest = {"schemaVersion": 2, "mediaType": OLLAMA_MANIFEST, "config": config_layer, "layers": layers}
    target = ollama_manifest_path(root, model.name)
    data = (json.dumps(manifest) + "\n").encode()
    if os.path.lexists(target) and not _same_bytes(target, data):
        raise UsageError(f"ollama already has a model {model.name}:{OLLAMA_TAG} ({target})",
                         hint=f"Remove it with `ollama rm {model.name}` or link under another --to.")
    _write(target, data, link)  # the same manifest already there: linked before, left as is


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        return not os.path.islink(path) and os.path.getsize(path) == len(data) and Path(path).read_bytes() == data
    except OSError:
        return False


# -- undoing ----------------------------------------------------------------------------------------

def _still_ours(m: Made, home: Path) -> bool:
    try:
        st = os.lstat(m.path)
    except OSError:
        return False
    if m.how == "hardlink":
        h = Hash("sha256", bytes.fromhex(m.sha256))
        try:
            b = os.stat(blob_path(h, home))
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (b.st_dev, b.st_ino)
    if m.how == "symlink":  # ours points at a blob named by its hash (ours or the view's own)
        try:
            return bool(m.sha256) and re.fullmatch(r"[0-9a-f]{64}", m.sha256) is not None and \
                os.readlink(m.path).endswith("/" + m.sha256)
        except OSError:
            return False
    if m.how == "file":
        try:
            with open(m.path, "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest() == m.sha256
        except OSError:
            return False
    return os.path.isdir(m.path) and not os.path.islink(m.path)


def _ollama_referenced(root: Path, digest_names: Set[str], skip: Path) -> Set[str]:
    """Of `digest_names` (sha256-HEX), those another ollama manifest still names."""
    used = set()
    for m in (root / "manifests").rglob("*"):  # host/ns/model/tag, and host/ns/kind/model/tag (name.go)
        if m == skip or not m.is_file():
            continue
        try:
            data = json.loads(m.read_text())
            for layer in [data.get("config") or {}] + list(data.get("layers") or []):
                used.add(str(layer.get("digest", "")).replace(":", "-"))
        except (OSError, ValueError, AttributeError):
            continue
    return used & digest_names


def _undo(link: Link, home: Optional[Path] = None) -> List[str]:
    """Remove what `link` made (last made first), only where it is still what we made; a
    symlink is removed, never followed; a directory only when empty."""
    removed = []
    keep: Set[str] = set()
    if link.layout == "ollama":
        manifest = [m for m in link.made if m.how == "file" and Path(m.path).parent.parent.parent.parent.name == "manifests"]
        names = {Path(m.path).name for m in link.made if Path(m.path).parent.name == "blobs"}
        keep = _ollama_referenced(Path(link.root), names, Path(manifest[0].path) if manifest else Path())
    root = os.path.abspath(link.root)
    for m in reversed(link.made):
        if Path(m.path).name in keep:
            continue
        if not os.path.abspath(m.path).startswith(root.rstrip(os.sep) + os.sep):
            continue  # a record naming a path outside the view's root is not ours (tampered)
        if home is not None and not _still_ours(m, home):
            continue
        try:
            if m.how == "dir":
                os.rmdir(m.path)
            else:
                os.unlink(m.path)
            removed.append(m.path)
        except OSError:
            pass
    return removed


# -- the record under the home --------------------------------------------------------------------

def _state(home: Path) -> Path:
    return Path(home) / STATE


def read_links(home: Path) -> List[Link]:
    try:
        data = json.loads(_state(home).read_text())
    except (OSError, ValueError):
        return []
    out = []
    for item in data.get("links", []) if isinstance(data, dict) else []:
        try:
            out.append(Link(str(item["name"]), str(item["layout"]), str(item["root"]),
                            [Made(str(m["path"]), str(m["how"]), m.get("sha256")) for m in item.get("made", [])],
                            [str(k) for k in item.get("kept", [])]))
        except (KeyError, TypeError, AttributeError):
            continue
    return out


def write_links(home: Path, links: Sequence[Link]) -> None:
    layout.ensure_home(home)
    atomic_write_text(_state(home), json.dumps({"links": [l.to_json() for l in links]}, indent=1, sort_keys=True) + "\n")


def record(home: Path, link: Link) -> Link:
    """Add `link` to links.json; linking the same model again keeps what the first run made
    (the second finds it "already there": it is still ours to remove). Returns the merged record."""
    key = (link.name, link.layout, link.root)
    links = read_links(home)
    old = next((l for l in links if (l.name, l.layout, l.root) == key), None)
    if old is not None:
        mine = {m.path for m in old.made}
        made = old.made + [m for m in link.made if m.path not in mine]
        link = Link(link.name, link.layout, link.root, made, [k for k in link.kept if k not in mine])
    write_links(home, [l for l in links if (l.name, l.layout, l.root) != key] + [link])
    return link


def remove(home: Path, name: str, view: Optional[str] = None, root: Optional[Path] = None) -> List[Tuple[Link, List[str]]]:
    """Undo the recorded links of `name` (of one layout / root if given)."""
    links = read_links(home)
    gone, rest = [], []
    for l in links:
        if l.name == name and (view is None or l.layout == view) and (root is None or Path(l.root) == Path(root)):
            gone.append((l, _undo(l, home)))
        else:
            rest.append(l)
    if gone:
        write_links(home, rest)
    return gone


def live(link: Link, home: Path) -> bool:
    """Does at least one of the links to a blob still exist, as we made it?"""
    return any(m.how in ("hardlink", "symlink") and _still_ours(m, home) for m in link.made)


def rooted_blobs(home: Path) -> Dict[str, Set[str]]:
    """gc's hook: model name -> sha256 hexes of blobs some existing link still shows."""
    out: Dict[str, Set[str]] = {}
    for l in read_links(home):
        for m in l.made:
            if m.how in ("hardlink", "symlink") and m.sha256 and _still_ours(m, home):
                out.setdefault(l.name, set()).add(m.sha256)
    return out
