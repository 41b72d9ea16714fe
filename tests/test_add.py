"""`pylmserv add`: config edited in place (comments kept), lock pinned, nothing written on
failure. Upstreams are loopback stand-ins (Hub API, GitHub API + git over dumb HTTP)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from pylmserv.core.errors import ConfigError, NetworkError, UsageError
from pylmserv.pins.add import add, derive_name, parse_spec
from pylmserv.transfer.hub import parse_hf
from pylmserv.pins.config import load_config, load_lock
from tests.conftest import run_cli
from tests.support import gitrepos
from tests.support.githubapi import serve_github
from tests.support.hubstub import serve_hub

USER_CONFIG = """\
# my models (a comment that must survive)
[models.tiny]   # trailing comment
url = "{url}"   # where it lives

# sources below
"""


@pytest.fixture
def gitenv(monkeypatch):
    for k, v in gitrepos.GIT_ENV.items():
        monkeypatch.setenv(k, v)


def test_derive_name_follows_the_name_rule():
    assert derive_name("qwen2.5-0.5b-instruct-q4_k_m.gguf") == "qwen2_5-0_5b-instruct-q4_k_m"
    assert derive_name("llama.cpp") == "llama_cpp"
    assert derive_name("cosmocc-3.3.6.zip") == "cosmocc-3_3_6"
    assert derive_name(".hidden/../x y.gguf") == "hidden____x_y"
    assert len(derive_name("a" * 300 + ".gguf")) == 64


@pytest.mark.parametrize("spec", ["hf://org/repo", "hf://org//x.gguf", "hf://org/repo/../x.gguf", "github:a",
                                  "github:a/b/c", "github:../b", "ftp://x/y.gguf", "nonsense", "hf://o/r/a\x1b.gguf"])
def test_bad_specs_are_usage_errors(spec):
    with pytest.raises(UsageError):
        parse_spec(spec)


@pytest.mark.parametrize("spec", ["hf://org/repo/dir/m.gguf@v1", "hf://org/repo/m.gguf", "hf://o/r/a@b/m.gguf@main",
                                  "hf://o/r/m.gguf@", "hf://o/r/a\\b.gguf", "hf://o/r/./m.gguf"])
def test_hf_specs_read_as_fetch_reads_them(spec):
    """`add` and `fetch hf://...` share one reader (transfer/hub.parse_hf): the same table, or both refuse."""
    try:
        repo, path, revision = parse_hf(spec)
    except UsageError:
        with pytest.raises(UsageError):
            parse_spec(spec)
        return
    assert parse_spec(spec).table == {"hf": repo, "file": path, "revision": revision}


@pytest.mark.parametrize("bad", ["a.b", "../x", ".x", "-x", "a/b", "x\x07", "a" * 101, ""])
def test_bad_names_refused(tmp_path, http_dir, bad):
    www, base = http_dir
    (www / "m.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(UsageError):
        add(f"{base}/m.gguf", name=bad, config=tmp_path / "pylmserv.toml", via="python")
    assert not (tmp_path / "pylmserv.toml").exists() and not (tmp_path / "pylmserv.lock").exists()


def test_config_name_rule_checked_at_load(tmp_path):
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text('[models."a.b"]\nurl = "https://x/y.gguf"\n')
    with pytest.raises(ConfigError, match="contains a dot"):
        load_config(cfg)


def test_add_url_model_keeps_comments_and_pins(tmp_path, http_dir):
    www, base = http_dir
    data = b"GGUF" + os.urandom(3000)
    (www / "Qwen2.5-Tiny.Q4.gguf").write_bytes(data)
    (www / "tiny.gguf").write_bytes(b"GGUF tiny")
    cfg = tmp_path / "pylmserv.toml"
    original = USER_CONFIG.format(url=f"{base}/tiny.gguf")
    cfg.write_text(original)
    result = add(f"{base}/Qwen2.5-Tiny.Q4.gguf", config=cfg, via="python")
    assert result.addition.name == "Qwen2_5-Tiny_Q4"
    text = cfg.read_text()
    assert text.startswith(original.rstrip("\n"))  # every byte the user wrote is still there
    assert "[models.Qwen2_5-Tiny_Q4]" in text
    lock = load_lock(tmp_path / "pylmserv.lock")
    entry = lock.models["Qwen2_5-Tiny_Q4"]
    assert entry.hash.hex == hashlib.sha256(data).hexdigest() and entry.size == len(data)
    assert "tiny" not in lock.models  # add pins only what it adds


def test_existing_name_refused_unless_force(tmp_path, http_dir):
    www, base = http_dir
    (www / "tiny.gguf").write_bytes(b"GGUF one")
    (www / "other.gguf").write_bytes(b"GGUF two")
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(USER_CONFIG.format(url=f"{base}/tiny.gguf") + "\n[sources.after]  # kept\ntype = \"url\"\n"
                   f"url = \"{base}/tiny.gguf\"\n")
    before = cfg.read_bytes()
    with pytest.raises(UsageError, match="already in"):
        add(f"{base}/other.gguf", name="tiny", config=cfg, via="python")
    assert cfg.read_bytes() == before and not (tmp_path / "pylmserv.lock").exists()
    add(f"{base}/other.gguf", name="tiny", config=cfg, via="python", force=True)
    text = cfg.read_text()
    assert text.count("[models.tiny]") == 1 and "other.gguf" in text and "tiny.gguf\"   #" not in text
    assert "# sources below" in text and "[sources.after]  # kept" in text  # neighbours untouched
    assert load_config(cfg).models["tiny"].url.endswith("/other.gguf")
    assert load_lock(tmp_path / "pylmserv.lock").models["tiny"].hash.hex == hashlib.sha256(b"GGUF two").hexdigest()


def test_failed_pin_writes_nothing(tmp_path, http_dir):
    www, base = http_dir
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(USER_CONFIG.format(url=f"{base}/tiny.gguf"))
    before = cfg.read_bytes()
    with pytest.raises(NetworkError):
        add(f"{base}/missing.gguf", config=cfg, via="python")
    assert cfg.read_bytes() == before and not (tmp_path / "pylmserv.lock").exists()


def test_add_hf_model_pins_commit_from_hub_standin(tmp_path, monkeypatch):
    with serve_hub() as hub:
        data = os.urandom(4096)
        commit = hub.add_file("org/Repo-GGUF", "sub/model.Q8_0.gguf", data)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        cfg = tmp_path / "pylmserv.toml"
        result = run_cli("--config", cfg, "add", "hf://org/Repo-GGUF/sub/model.Q8_0.gguf", "--json", "--via", "python")
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
    assert out["name"] == "model_Q8_0" and out["pin"]["rev"] == commit
    spec = load_config(cfg).models["model_Q8_0"]
    assert (spec.hf, spec.file, spec.revision) == ("org/Repo-GGUF", "sub/model.Q8_0.gguf", "main")
    entry = load_lock(tmp_path / "pylmserv.lock").models["model_Q8_0"]
    assert entry.hash.hex == hashlib.sha256(data).hexdigest() and entry.rev == commit


def test_add_github_without_ref_takes_newest_release_and_tracks_it(tmp_path, http_dir, monkeypatch, gitenv):
    www, base = http_dir
    src = gitrepos.make_repo(tmp_path / "src", {"README": "one\n"})
    gitrepos.tag(src, "v1.2")
    gitrepos.commit(src, {"README": "two\n"})
    gitrepos.tag(src, "v1.10")
    gitrepos.publish_github(www, "owner", "tool.kit", src)
    with serve_github() as gh:
        gh.add_repo("owner", "tool.kit", src)
        for tag in ("v1.2", "v1.10"):
            gh.release("owner", "tool.kit", tag)
        gh.release("owner", "tool.kit", "v2.0-rc1", prerelease=True)
        monkeypatch.setenv("PYLMSERV_GITHUB_API", gh.url)
        monkeypatch.setenv("PYLMSERV_GITHUB_URL", base)
        cfg = tmp_path / "pylmserv.toml"
        result = add("github:owner/tool.kit", config=cfg, via="python")
    assert result.addition.name == "tool_kit"
    spec = load_config(cfg).sources["tool_kit"]
    assert spec.ref == "v1.10" and spec.follow == {"track": "releases"}
    entry = load_lock(tmp_path / "pylmserv.lock").sources["tool_kit"]
    assert entry.rev == gitrepos.git(src, "rev-parse", "v1.10^{commit}")


def test_add_github_with_ref_and_url_archive_unpack(tmp_path, http_dir, monkeypatch, gitenv):
    www, base = http_dir
    src = gitrepos.make_repo(tmp_path / "src", {"a.txt": "a\n"})
    gitrepos.publish_github(www, "o", "r", src)
    monkeypatch.setenv("PYLMSERV_GITHUB_URL", base)
    cfg = tmp_path / "pylmserv.toml"
    add("github:o/r@main", config=cfg, via="python")
    assert load_config(cfg).sources["r"].ref == "main" and not load_config(cfg).sources["r"].follow
    import tarfile
    with tarfile.open(www / "pkg-1.0.tar.gz", "w:gz") as tar:
        tar.add(src / "a.txt", arcname="pkg-1.0/a.txt")
    add(f"{base}/pkg-1.0.tar.gz", unpack=True, config=cfg, via="python")
    lock = load_lock(tmp_path / "pylmserv.lock")
    assert lock.sources["pkg-1_0"].mode == "nar" and lock.sources["r"].mode == "nar"


def test_packaged_catalog_is_not_edited(tmp_path):
    from pylmserv.pins.config import packaged_dir

    with pytest.raises(UsageError, match="packaged"):
        add("https://example.invalid/x.gguf", config=packaged_dir() / "pylmserv.toml")


def test_force_across_kinds_leaves_no_old_pin(tmp_path, http_dir):
    www, base = http_dir
    (www / "x.gguf").write_bytes(b"GGUF x")
    (www / "x.bin").write_bytes(b"tool")
    cfg = tmp_path / "pylmserv.toml"
    add(f"{base}/x.gguf", config=cfg, via="python")
    add(f"{base}/x.bin", name="x", force=True, config=cfg, via="python")
    lock = load_lock(tmp_path / "pylmserv.lock")
    assert "x" in lock.sources and "x" not in lock.models
    assert "[models.x]" not in cfg.read_text() and list(load_config(cfg).sources) == ["x"]
