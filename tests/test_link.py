"""`pylmserv link`: the store's own files, laid out where other tools look.

- hf: read back by the real huggingface_hub with HF_HUB_OFFLINE=1 (hf_hub_download,
  try_to_load_from_cache, scan_cache_dir) - it must return pylmserv's own inode.
- ollama: the layout and manifest as ollama's source defines them (ollama cannot be
  installed here), read at these files and commits of github.com/ollama/ollama:
    manifest/manifest.go @ 369dfe07baa35e5d3500d36a2501680de40cf279 - type Manifest
      {schemaVersion, mediaType, config Layer, layers []Layer}; WriteManifest writes
      SchemaVersion 2, MediaType "application/vnd.docker.distribution.manifest.v2+json";
      Manifests() globs manifests/*/*/*/* and ParseNameFromFilepath reads host/namespace/model/tag
    manifest/layer.go @ c73feaf73de0a6b2874108e5b71efa9c7375dec7 - Layer {mediaType, digest
      "sha256:<hex>", size}; a layer's digest is the sha256 of the blob's bytes
    manifest/paths.go @ c73feaf73de0a6b2874108e5b71efa9c7375dec7 - BlobsPath: digest must match
      ^sha256[:-][0-9a-fA-F]{64}$, file blobs/sha256-<hex>; manifests under $OLLAMA_MODELS/manifests
    types/model/name.go @ 5c0caaff8698121a5efad3bd0a10061ad9c0f558 - defaults registry.ollama.ai /
      library / latest; Filepath() = {host}/{namespace}/{model}/{tag}; part rules (isValidPart)
    types/model/config.go @ 8852220f59c12cf3165f5643d38453ffecbb722d - ConfigV2 {model_format,
      model_family, model_families, model_type, file_type, architecture, os, rootfs{type, diff_ids}}
    server/images.go GetModel: layer media types application/vnd.ollama.image.model (the GGUF),
      .template (parsed as a Go template), .params (JSON decoded into options); config
      application/vnd.docker.container.image.v1+json
- lmstudio: LM Studio's documented models folder layout ~/.lmstudio/models/PUBLISHER/REPO/FILE
  (lmstudio.ai/docs "Manage models" / "Import models": publisher/repository/model-file.gguf).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from pylmserv.core.hashing import Hash
from pylmserv.store import views
from tests.conftest import run_cli
from tests.test_adopt import hf_pin, inode, tools, url_pin, write_project  # noqa: F401 (fixture)
from tests.test_gguf import write_gguf

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}")


def chat_gguf(path: Path, template=CHATML, arch="qwen2") -> bytes:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    if template:
        w.add_chat_template(template)
    w.add_tensor("t", np.zeros(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture
def fetched(home, tools, tmp_path):
    """A project with an hf pin `m` and a url pin `u`, both in the store (fetched from file://)."""
    m = chat_gguf(tmp_path / "m.gguf")
    u = write_gguf(tmp_path / "u.gguf").read_bytes()
    commit = "a" * 40
    config, lock = write_project(tmp_path / "proj", [hf_pin("m", "org/repo", "sub/m.gguf", commit, m),
                                                     url_pin("u", (tmp_path / "u.gguf").as_uri(), u)])
    from pylmserv.store import blobs

    for data, name in ((m, "m.gguf"), (u, "u.gguf")):
        staged = tmp_path / f"{name}.staged"
        staged.write_bytes(data)
        blobs.install_blob(staged, Hash.of_bytes(data), home)
    return {"proj": tmp_path / "proj", "m": m, "u": u, "commit": commit, "env": {"PYLMSERV_HOME": str(home)}}


def link(fetched, *args):
    proc = run_cli("link", *args, env=fetched["env"], cwd=fetched["proj"])
    assert proc.returncode == 0, proc.stderr
    return proc


def test_hf_view_is_read_by_the_real_huggingface_hub_offline(home, fetched, tools, monkeypatch):
    link(fetched, "m", "--layout", "hf")
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = home / "blobs" / "sha256" / Hash.of_bytes(fetched["m"]).hex
    cache = str(tools["hf"])
    got = huggingface_hub.hf_hub_download("org/repo", "sub/m.gguf", revision=fetched["commit"], cache_dir=cache)
    assert inode(got) == inode(ours)  # pylmserv's own file, not a copy
    got_main = huggingface_hub.hf_hub_download("org/repo", "sub/m.gguf", cache_dir=cache)  # refs/main
    assert inode(got_main) == inode(ours)
    assert inode(huggingface_hub.try_to_load_from_cache("org/repo", "sub/m.gguf", cache_dir=cache)) == inode(ours)
    info = huggingface_hub.scan_cache_dir(cache)
    [repo] = info.repos
    assert repo.repo_id == "org/repo" and not info.warnings
    [rev] = repo.revisions
    assert rev.commit_hash == fetched["commit"] and "main" in rev.refs
    # A URL pin that is not on the Hub has no hf view.
    proc = run_cli("link", "u", "--layout", "hf", env=fetched["env"], cwd=fetched["proj"])
    assert proc.returncode == 2 and "not a Hugging Face file" in proc.stderr


def test_ollama_view_matches_ollamas_format(home, fetched, tools):
    link(fetched, "m", "--layout", "ollama")
    root = tools["ollama"]
    manifest_path = root / "manifests" / "registry.ollama.ai" / "library" / "m" / "latest"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert set(manifest) == {"schemaVersion", "mediaType", "config", "layers"}
    layers = manifest["layers"] + [manifest["config"]]
    for layer in layers:
        assert set(layer) == {"mediaType", "digest", "size"}
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", layer["digest"])  # paths.go BlobsPath's pattern
        blob = root / "blobs" / layer["digest"].replace(":", "-")
        data = blob.read_bytes()
        assert Hash.of_bytes(data).hex == layer["digest"][7:] and len(data) == layer["size"]
    kinds = {layer["mediaType"]: layer for layer in manifest["layers"]}
    model = kinds["application/vnd.ollama.image.model"]
    ours = home / "blobs" / "sha256" / Hash.of_bytes(fetched["m"]).hex
    assert inode(root / "blobs" / model["digest"].replace(":", "-")) == inode(ours)  # a hard link, no copy
    template = (root / "blobs" / kinds["application/vnd.ollama.image.template"]["digest"].replace(":", "-")).read_text()
    assert "<|im_start|>" in template and "{{ .Prompt }}" in template and "{%" not in template  # a Go template
    params = json.loads((root / "blobs" / kinds["application/vnd.ollama.image.params"]["digest"].replace(":", "-")).read_bytes())
    assert params == {"stop": ["<|im_start|>", "<|im_end|>"]}
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    config = json.loads((root / "blobs" / manifest["config"]["digest"].replace(":", "-")).read_bytes())
    assert {"model_format", "model_family", "model_families", "model_type", "file_type", "architecture", "os",
            "rootfs"} <= set(config)
    assert config["model_format"] == "gguf" and config["model_family"] == "qwen2"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [l["digest"] for l in manifest["layers"]]}
    # Manifests() globs manifests/*/*/*/*: the file sits exactly four levels down.
    assert manifest_path in list((root / "manifests").glob("*/*/*/*"))


def test_ollama_view_without_a_known_chat_template_has_only_the_model(home, tools, tmp_path):
    data = chat_gguf(tmp_path / "plain.gguf", template=None, arch="llama")
    write_project(tmp_path / "proj", [url_pin("plain", (tmp_path / "plain.gguf").as_uri(), data)])
    env = {"PYLMSERV_HOME": str(home)}
    assert run_cli("fetch", "plain", env=env, cwd=tmp_path / "proj").returncode == 0
    proc = run_cli("link", "plain", "--layout", "ollama", "--to", tmp_path / "o", env=env, cwd=tmp_path / "proj")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "o" / "manifests" / "registry.ollama.ai" / "library" / "plain" / "latest").read_text())
    assert [l["mediaType"] for l in manifest["layers"]] == ["application/vnd.ollama.image.model"]


def test_lmstudio_view_and_remove(home, fetched, tools):
    link(fetched, "m", "u", "--layout", "lmstudio")
    lm = tools["lmstudio"]
    assert inode(lm / "org" / "repo" / "m.gguf") == inode(home / "blobs" / "sha256" / Hash.of_bytes(fetched["m"]).hex)
    assert inode(lm / "pylmserv" / "u" / "u.gguf") == inode(home / "blobs" / "sha256" / Hash.of_bytes(fetched["u"]).hex)
    # A file of LM Studio's own beside ours stays when ours goes.
    (lm / "org" / "repo" / "theirs.gguf").write_bytes(b"theirs")
    proc = run_cli("link", "--remove", "m", "u", env=fetched["env"], cwd=fetched["proj"])
    assert proc.returncode == 0, proc.stderr
    assert not (lm / "org" / "repo" / "m.gguf").exists() and not (lm / "pylmserv").exists()
    assert (lm / "org" / "repo" / "theirs.gguf").read_bytes() == b"theirs"
    assert (home / "blobs" / "sha256" / Hash.of_bytes(fetched["m"]).hex).read_bytes() == fetched["m"]


def test_a_tools_own_file_is_never_replaced_nor_removed(home, fetched, tools):
    own = tools["lmstudio"] / "org" / "repo" / "m.gguf"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"the user's own file")
    proc = link(fetched, "m", "--layout", "lmstudio")
    assert "already there, left alone" in proc.stdout
    run_cli("link", "--remove", "m", env=fetched["env"], cwd=fetched["proj"], check=True)
    assert own.read_bytes() == b"the user's own file"


def test_linking_twice_is_idempotent_and_remove_still_removes_all(home, fetched, tools):
    for _ in range(2):
        link(fetched, "m", "--layout", "ollama")
        link(fetched, "m", "--layout", "hf")
    root = tools["ollama"]
    run_cli("link", "--remove", "m", env=fetched["env"], cwd=fetched["proj"], check=True)
    assert not (root / "manifests").exists() or not any((root / "manifests").rglob("latest"))
    assert not any((root / "blobs").iterdir()) if (root / "blobs").exists() else True
    assert not (tools["hf"] / "models--org--repo").exists()


def test_an_ollama_model_of_the_same_name_is_not_overwritten(home, fetched, tools):
    target = tools["ollama"] / "manifests" / "registry.ollama.ai" / "library" / "m" / "latest"
    target.parent.mkdir(parents=True)
    target.write_text('{"schemaVersion": 2, "layers": []}')
    proc = run_cli("link", "m", "--layout", "ollama", env=fetched["env"], cwd=fetched["proj"])
    assert proc.returncode == 2 and "already has a model m:latest" in proc.stderr
    assert target.read_text() == '{"schemaVersion": 2, "layers": []}'
    assert not (tools["ollama"] / "blobs").exists() or not any((tools["ollama"] / "blobs").iterdir())  # undone


def test_a_tampered_record_removes_nothing_that_is_not_ours(home, fetched, tools, tmp_path):
    link(fetched, "m", "--layout", "lmstudio")
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    elsewhere = tmp_path / "a-link"
    elsewhere.symlink_to(victim)
    inside = tools["lmstudio"] / "org" / "repo" / "user-link"
    inside.symlink_to(victim)
    state = json.loads((home / "links.json").read_text())
    hexd = Hash.of_bytes(fetched["m"]).hex
    state["links"][0]["made"] += [{"path": str(victim), "how": "file", "sha256": Hash.of_bytes(b"keep me").hex},
                                  {"path": str(elsewhere), "how": "symlink", "sha256": hexd},
                                  {"path": str(inside), "how": "symlink", "sha256": hexd}]
    (home / "links.json").write_text(json.dumps(state))
    run_cli("link", "--remove", "m", env=fetched["env"], cwd=fetched["proj"], check=True)
    assert victim.read_text() == "keep me" and elsewhere.is_symlink() and inside.is_symlink()
    assert not (tools["lmstudio"] / "org" / "repo" / "m.gguf").exists()  # ours went


def test_remove_ollama_keeps_blobs_another_manifest_uses(home, fetched, tools):
    link(fetched, "m", "--layout", "ollama")
    root = tools["ollama"]
    # The user copies the model in ollama (`ollama cp m m2` copies the manifest file).
    other = root / "manifests" / "registry.ollama.ai" / "library" / "m2" / "latest"
    other.parent.mkdir(parents=True)
    other.write_bytes((root / "manifests" / "registry.ollama.ai" / "library" / "m" / "latest").read_bytes())
    run_cli("link", "--remove", "m", env=fetched["env"], cwd=fetched["proj"], check=True)
    assert not (root / "manifests" / "registry.ollama.ai" / "library" / "m").exists()
    for layer in json.loads(other.read_text())["layers"]:
        assert (root / "blobs" / layer["digest"].replace(":", "-")).exists()


def test_a_link_is_a_gc_root_only_while_it_exists(home, fetched, tools, tmp_path):
    from pylmserv.app.gc import collect

    link(fetched, "u", "--layout", "lmstudio")
    os.unlink(fetched["proj"] / "pylmserv.lock")  # no lock roots anything any more
    ub = home / "blobs" / "sha256" / Hash.of_bytes(fetched["u"]).hex
    mb = home / "blobs" / "sha256" / Hash.of_bytes(fetched["m"]).hex
    collect(home)
    assert ub.exists() and not mb.exists()  # the linked one stays, the other goes
    (tools["lmstudio"] / "pylmserv" / "u" / "u.gguf").unlink()  # the user deleted the view
    collect(home)
    assert not ub.exists()


def test_list_shows_what_is_linked(home, fetched, tools):
    link(fetched, "m", "--layout", "lmstudio")
    proc = run_cli("list", env=fetched["env"], cwd=fetched["proj"])
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"linked: m \(lmstudio\) .*org/repo/m\.gguf", proc.stdout), proc.stdout
    doc = json.loads(run_cli("list", "--json", env=fetched["env"], cwd=fetched["proj"], check=True).stdout)
    assert doc["links"][0]["name"] == "m" and doc["links"][0]["layout"] == "lmstudio"


def test_round_trip_ollama_view_is_adopted_by_a_second_store(home, fetched, tools, tmp_path):
    """What `link --layout ollama` lays out is what adopt reads: a second store takes it with
    no download (the two views agree on ollama's blob naming)."""
    link(fetched, "m", "--layout", "ollama")
    second = tmp_path / "home2"
    proc = run_cli("fetch", "--offline", "m", env={"PYLMSERV_HOME": str(second)}, cwd=fetched["proj"])
    assert proc.returncode == 0, proc.stderr
    assert inode(second / "blobs" / "sha256" / Hash.of_bytes(fetched["m"]).hex) == \
        inode(home / "blobs" / "sha256" / Hash.of_bytes(fetched["m"]).hex)
