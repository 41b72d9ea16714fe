"""prefetch (library API): resolvers against loopback stand-ins, Nix as the hash oracle."""
from __future__ import annotations

import contextlib
import logging
import subprocess
from pathlib import Path

import pytest

from pylmserv.pins.config import load_lock
from pylmserv.core.errors import NetworkError, UsageError, VerificationError
from pylmserv.core.hashing import Hash
from pylmserv.pins.prefetch import prefetch
from tests.support import gitrepos
from tests.support.hubstub import serve_hub
from tests.test_archive import MULTI_ROOT, RICH_TREE, write_tar, write_zip


def nix_unpack(url: str) -> Hash:
    out = subprocess.run(["nix-prefetch-url", "--unpack", url], capture_output=True, text=True, timeout=120, check=True)
    return Hash.parse(out.stdout.split()[-1], algo="sha256")


def nix_flat(url: str) -> Hash:
    out = subprocess.run(["nix-prefetch-url", url], capture_output=True, text=True, timeout=120, check=True)
    return Hash.parse(out.stdout.split()[-1], algo="sha256")


@pytest.fixture
def github(http_dir, tmp_path, monkeypatch, gitenv):
    """A github.com stand-in on loopback holding owner/proj with tag v1 (annotated) and main."""
    www, base = http_dir
    src = gitrepos.make_repo(tmp_path / "proj-src", {"README.md": "proj\n", "bin/run": ("exec", "#!/bin/sh\n"),
                                                     "lib/link": ("link", "../README.md")})
    gitrepos.tag(src, "v1")
    gitrepos.publish_github(www, "owner", "proj", src)
    monkeypatch.setenv("PYLMSERV_GITHUB_URL", base)
    return www, base, src


@contextlib.contextmanager
def prefetch_log(caplog):
    """Capture pylmserv.prefetch's INFO lines even after a CLI run in this process set
    propagate=False on the pylmserv logger."""
    logger = logging.getLogger("pylmserv.prefetch")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="pylmserv.prefetch"):
            yield
    finally:
        logger.removeHandler(caplog.handler)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GITHUB_CFG = """
[sources.proj]
type = "github"
owner = "owner"
repo = "proj"
ref = "{ref}"
version = "1.0"
description = "not copied to the lock"
"""


@pytest.mark.nix
def test_github_tag_resolves_peeled_commit_and_matches_nix(tmp_path, github, nix):
    www, base, src = github
    cfg = write_config(tmp_path / "pylmserv.toml", GITHUB_CFG.format(ref="v1"))
    result = prefetch(config=cfg, via="python")
    assert result.written and [c.status for c in result.changes] == ["added"]
    entry = load_lock(tmp_path / "pylmserv.lock").sources["proj"]
    commit = gitrepos.head(src)
    assert entry.rev == commit  # the annotated tag is peeled to its commit
    assert entry.url == f"https://github.com/owner/proj/archive/{commit}.tar.gz"
    assert entry.hash == nix_unpack(f"{base}/owner/proj/archive/{commit}.tar.gz")
    assert entry.extra == {"type": "github", "owner": "owner", "repo": "proj", "ref": "v1",
                           "submodules": False, "version": "1.0", "git_url": "https://github.com/owner/proj.git"}


def test_unchanged_ref_is_not_refetched_and_moved_ref_updates(tmp_path, github):
    www, base, src = github
    cfg = write_config(tmp_path / "pylmserv.toml", GITHUB_CFG.format(ref="main"))
    prefetch(config=cfg, via="python")
    lock_bytes = (tmp_path / "pylmserv.lock").read_bytes()
    old = load_lock(tmp_path / "pylmserv.lock").sources["proj"]
    for f in (www / "owner/proj/archive").iterdir():
        f.unlink()  # a refetch would now fail with 404
    again = prefetch(config=cfg, via="python")
    assert [c.status for c in again.changes] == ["unchanged"] and not again.written
    assert (tmp_path / "pylmserv.lock").read_bytes() == lock_bytes
    new_commit = gitrepos.commit(src, {"README.md": "proj v2\n"})
    gitrepos.publish_github(www, "owner", "proj", src)
    moved = prefetch(config=cfg, via="python")
    (change,) = moved.changes
    assert change.status == "updated" and change.old.rev == old.rev and change.new.rev == new_commit
    assert change.new.hash != old.hash
    assert "->" in change.describe()
    with pytest.raises(NetworkError, match="HTTP 404"):  # --refresh really refetches
        for f in (www / "owner/proj/archive").iterdir():
            f.unlink()
        prefetch(config=cfg, via="python", refresh=True)


def test_missing_ref_is_a_usage_error_and_lock_untouched(tmp_path, github):
    cfg = write_config(tmp_path / "pylmserv.toml", GITHUB_CFG.format(ref="v1"))
    prefetch(config=cfg, via="python")
    before = (tmp_path / "pylmserv.lock").read_bytes()
    write_config(cfg, GITHUB_CFG.format(ref="v9-does-not-exist"))
    with pytest.raises(UsageError, match="ref 'v9-does-not-exist' not found"):
        prefetch(config=cfg, via="python")
    assert (tmp_path / "pylmserv.lock").read_bytes() == before


@pytest.mark.nix
def test_git_submodules_python_and_fod_agree_with_fetchgit(tmp_path, gitenv, nix):
    sub = gitrepos.make_repo(tmp_path / "sub", {"s.c": "int s;\n"})
    top = gitrepos.make_repo(tmp_path / "top", {"t.c": "int t;\n", "x": ("exec", "#!\n")})
    rev = gitrepos.add_submodule(top, sub, "third_party/sub")
    gitrepos.git(top, "branch", "release")
    cfg = write_config(tmp_path / "pylmserv.toml",
                       f'[sources.top]\ntype = "git"\nurl = "{gitrepos.uri(top)}"\nref = "release"\nsubmodules = true\n')
    py = prefetch(config=cfg, via="python").changes[0].new
    fod = prefetch(config=cfg, via="fod", refresh=True).changes[0].new
    assert py.rev == rev and py.hash == fod.hash
    assert py.extra["submodules"] is True and py.url == gitrepos.uri(top)


@pytest.mark.nix
def test_url_sources_and_models_all_backends(tmp_path, http_dir, nix):
    www, base = http_dir
    write_zip(www / "tool.zip", RICH_TREE[:-1])
    write_tar(www / "multi.tar.gz", MULTI_ROOT)
    write_tar(www / "single.tar.xz", RICH_TREE, "xz")
    (www / "m.gguf").write_bytes(b"GGUF" + bytes(5000))
    cfg = write_config(tmp_path / "pylmserv.toml", f"""
[sources.tool]
type = "url"
url = "{base}/tool.zip"
[sources.multi]
type = "url"
url = "{base}/multi.tar.gz"
unpack = true
[sources.single]
type = "url"
url = "{base}/single.tar.xz"
unpack = true
[models.m]
url = "{base}/m.gguf"
""")
    lock = tmp_path / "pylmserv.lock"
    prefetch(config=cfg, via="python")
    py = load_lock(lock)
    assert py.sources["tool"].hash == nix_flat(f"{base}/tool.zip") and py.sources["tool"].mode == "flat"
    assert py.sources["tool"].size == (www / "tool.zip").stat().st_size
    assert py.sources["multi"].hash == nix_unpack(f"{base}/multi.tar.gz")
    assert py.sources["single"].hash == nix_unpack(f"{base}/single.tar.xz")
    assert py.models["m"].hash == Hash.of_bytes((www / "m.gguf").read_bytes()) and py.models["m"].size == 5004
    text = lock.read_text()
    for via in ("nix", "auto"):
        result = prefetch(config=cfg, via=via, refresh=True)
        assert [c.status for c in result.changes] == ["unchanged"] * 4, via
        assert lock.read_text() == text
    fod = prefetch(["tool", "single", "m"], config=cfg, via="fod", refresh=True)
    assert [c.status for c in fod.changes] == ["unchanged"] * 3
    with pytest.raises(UsageError, match="several top-level entries"):
        prefetch(["multi"], config=cfg, via="fod", refresh=True)
    assert lock.read_text() == text


def test_check_reports_drift_and_writes_nothing(tmp_path, http_dir):
    www, base = http_dir
    (www / "a.bin").write_bytes(b"one")
    (www / "b.bin").write_bytes(b"two")
    cfg = write_config(tmp_path / "pylmserv.toml",
                       f'[models.a]\nurl = "{base}/a.bin"\n[models.b]\nurl = "{base}/b.bin"\n')
    prefetch(config=cfg, via="python")
    before = (tmp_path / "pylmserv.lock").read_bytes()
    assert prefetch(config=cfg, via="python", check=True).drift == []
    (www / "b.bin").write_bytes(b"two, changed upstream")
    result = prefetch(config=cfg, via="python", check=True)
    assert [(d.name, d.fields) for d in result.drift] == [("b", ["hash", "size"])]
    assert "hash sha256-" in result.drift[0].describe()
    assert (tmp_path / "pylmserv.lock").read_bytes() == before


def test_error_in_second_entry_leaves_lock_byte_for_byte(tmp_path, http_dir):
    www, base = http_dir
    (www / "a.bin").write_bytes(b"one")
    cfg = write_config(tmp_path / "pylmserv.toml", f'[models.a]\nurl = "{base}/a.bin"\n')
    prefetch(config=cfg, via="python")
    before = (tmp_path / "pylmserv.lock").read_bytes()
    (www / "a.bin").write_bytes(b"one, new")
    write_config(cfg, f'[models.a]\nurl = "{base}/a.bin"\n[models.z]\nurl = "{base}/missing.bin"\n')
    with pytest.raises(NetworkError, match="HTTP 404"):
        prefetch(config=cfg, via="python", refresh=True)
    assert (tmp_path / "pylmserv.lock").read_bytes() == before
    assert not list(tmp_path.glob(".pylmserv.lock.*"))


def test_published_pin_mismatch_is_refused(tmp_path, http_dir):
    www, base = http_dir
    (www / "a.bin").write_bytes(b"one")
    wrong = Hash.of_bytes(b"other")
    cfg = write_config(tmp_path / "pylmserv.toml", f'[models.a]\nurl = "{base}/a.bin"\nsha256 = "{wrong.hex}"\n')
    with pytest.raises(VerificationError, match="pins"):
        prefetch(config=cfg, via="python")
    assert not (tmp_path / "pylmserv.lock").exists()


def test_unknown_name_and_packaged_default_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pylmserv.toml here: the packaged catalog is used
    from pylmserv.pins.config import packaged_dir
    before = (packaged_dir() / "pylmserv.lock").read_bytes()
    with pytest.raises(UsageError, match="refusing to write the packaged default lock") as exc:
        prefetch(["llama-cpp"])
    assert "pylmserv.toml" in exc.value.hint
    with pytest.raises(UsageError, match="unknown name"):
        prefetch(["nope"])
    assert (packaged_dir() / "pylmserv.lock").read_bytes() == before


# -- Hugging Face -----------------------------------------------------------------------

HF_CFG = """
[models.big]
hf = "org/models"
file = "big.gguf"
revision = "{rev}"
[models.small]
hf = "org/models"
file = "sub/small.gguf"
revision = "{rev}"
"""


def test_hf_lfs_metadata_without_download_and_plain_git_fallback(tmp_path, monkeypatch):
    big, small = b"GGUF" + bytes(range(256)) * 40, b"GGUF tiny"
    with serve_hub() as hub:
        hub.add_file("org/models", "big.gguf", big)
        commit = hub.add_file("org/models", "sub/small.gguf", small)  # under the LFS threshold: plain git
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        cfg = write_config(tmp_path / "pylmserv.toml", HF_CFG.format(rev="main"))
        prefetch(config=cfg, via="python")
        lock = load_lock(tmp_path / "pylmserv.lock")
        assert lock.models["big"].hash == Hash.of_bytes(big) and lock.models["big"].size == len(big)
        assert lock.models["small"].hash == Hash.of_bytes(small) and lock.models["small"].size == len(small)
        assert lock.models["big"].rev == commit
        assert lock.models["big"].url == f"{hub.url}/org/models/resolve/{commit}/big.gguf"
        downloads = [p for m, p, _ in hub.requests if "/resolve/" in p]
        assert set(downloads) == {f"/org/models/resolve/{commit}/sub/small.gguf"}  # only the non-LFS file
        hub.requests.clear()
        prefetch(config=cfg, via="python")  # unchanged: only the revision lookup
        assert all("/revision/" in p for _, p, _ in hub.requests)


def test_hf_paths_info_missing_falls_back_to_tree_then_download(tmp_path, monkeypatch):
    big = bytes(range(256)) * 40
    with serve_hub() as hub:
        commit = hub.add_file("org/models", "big.gguf", big)
        hub.add_file("org/models", "sub/small.gguf", b"x" * 2000)
        commit = hub.repos["org/models"].branches["main"]
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.fail("paths-info", 404, times=2)
        cfg = write_config(tmp_path / "pylmserv.toml", HF_CFG.format(rev=commit))
        prefetch(config=cfg, via="python")
        assert any("/tree/" in p for _, p, _ in hub.requests)
        assert not any("/resolve/" in p for _, p, _ in hub.requests)
        assert not any("/revision/" in p for _, p, _ in hub.requests)  # a commit needs no lookup
        hub.requests.clear()
        hub.fail("paths-info", 500, times=1)
        hub.fail("/tree/", 500, times=1)
        prefetch(["big"], config=cfg, via="python", refresh=True)
        assert any("/resolve/" in p for _, p, _ in hub.requests)
        assert load_lock(tmp_path / "pylmserv.lock").models["big"].hash == Hash.of_bytes(big)


def test_hf_token_sent_and_required(tmp_path, monkeypatch):
    with serve_hub(token="hf_secret_123") as hub:
        hub.add_file("org/models", "big.gguf", bytes(5000))
        hub.add_file("org/models", "sub/small.gguf", bytes(5000))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        cfg = write_config(tmp_path / "pylmserv.toml", HF_CFG.format(rev="main"))
        with pytest.raises(NetworkError) as exc:
            prefetch(config=cfg, via="python")
        assert "HF_TOKEN" in exc.value.hint
        monkeypatch.setenv("HF_TOKEN", "hf_secret_123")
        prefetch(config=cfg, via="python")
        assert all(auth == "Bearer hf_secret_123" for _, _, auth in hub.requests[-3:])
        assert "hf_secret_123" not in (tmp_path / "pylmserv.lock").read_text()


def test_hf_unknown_revision(tmp_path, monkeypatch):
    with serve_hub() as hub:
        hub.add_file("org/models", "big.gguf", bytes(10))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        cfg = write_config(tmp_path / "pylmserv.toml", '[models.big]\nhf = "org/models"\nfile = "big.gguf"\nrevision = "v9"\n')
        with pytest.raises(UsageError, match="no revision 'v9'"):
            prefetch(config=cfg, via="python")


@pytest.mark.nix
def test_hf_private_plain_git_file_with_token_under_auto(tmp_path, monkeypatch, nix, caplog):
    """auto must not hand an authenticated download to nix-prefetch-url (it cannot send the
    token): the Hub sees no request without the token, and the log says why."""
    with serve_hub(token="hf_tok") as hub:
        hub.add_file("org/models", "big.gguf", b"tiny", lfs=False)
        hub.add_file("org/models", "sub/small.gguf", b"tiny2", lfs=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_tok")
        cfg = write_config(tmp_path / "pylmserv.toml", HF_CFG.format(rev="main"))
        with prefetch_log(caplog):
            prefetch(config=cfg, via="auto")
        assert load_lock(tmp_path / "pylmserv.lock").models["big"].hash == Hash.of_bytes(b"tiny")
        # The behaviour, not only the result: nix-prefetch-url was never handed the download
        # (it would have reached the Hub without the token), and the log says why.
        assert hub.requests and all(auth == "Bearer hf_tok" for _, _, auth in hub.requests), hub.requests
        assert "big: not cross-checked: nix-prefetch-url cannot send the authentication" in caplog.text


def test_public_api_name():
    import pylmserv
    import pylmserv.pins.prefetch
    assert pylmserv.prefetch is pylmserv.pins.prefetch.prefetch


def test_resolve_ref_kinds(tmp_path, gitenv):
    from pylmserv.pins.resolvers.git import resolve_ref

    repo = gitrepos.make_repo(tmp_path / "r", {"a": "1"})
    first = gitrepos.head(repo)
    gitrepos.tag(repo, "light", annotated=False)
    gitrepos.tag(repo, "heavy", annotated=True)
    second = gitrepos.commit(repo, {"a": "2"})
    gitrepos.git(repo, "branch", "heavy")  # a branch with a tag's name: the tag wins, as in git
    url = gitrepos.uri(repo)
    assert resolve_ref(url, "light") == first
    assert resolve_ref(url, "heavy") == first  # annotated tag peeled to the commit, not the tag object
    assert resolve_ref(url, "main") == second
    assert resolve_ref(url, "refs/heads/heavy") == second
    assert resolve_ref(url, "HEAD") == second
    assert resolve_ref(url, first) == first  # a full SHA is taken as is
    with pytest.raises(UsageError, match="not found"):
        resolve_ref(url, first[:12])  # abbreviated SHAs are not resolvable remotely
