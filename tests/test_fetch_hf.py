"""hf://org/repo/file.gguf[@rev] against the loopback Hub stand-in (HF_ENDPOINT)."""
from __future__ import annotations

import pytest

from pylmserv.pins.config import Lock, LockEntry, load_lock
from pylmserv.core.errors import NetworkError, UsageError
from pylmserv.core.hashing import Hash
from pylmserv.app.fetch_models import fetch
from pylmserv.transfer.hub import parse_hf
from tests.conftest import run_cli
from tests.support.hubstub import serve_hub
from tests.test_gguf import write_gguf


@pytest.fixture
def hub(monkeypatch):
    with serve_hub() as stub:
        monkeypatch.setenv("HF_ENDPOINT", stub.url)
        yield stub


def test_parse_hf():
    assert parse_hf("hf://org/repo/dir/m.gguf@v1") == ("org/repo", "dir/m.gguf", "v1")
    assert parse_hf("hf://org/repo/m.gguf") == ("org/repo", "m.gguf", "main")
    with pytest.raises(UsageError):
        parse_hf("hf://org/m.gguf")


def test_hf_file_is_resolved_pinned_to_a_commit_and_verified(home, hub, tmp_path):
    data = write_gguf(tmp_path / "m.gguf", pad=1 << 20).read_bytes()
    commit = hub.add_file("org/repo", "sub/m.gguf", data)
    [r] = fetch(["hf://org/repo/sub/m.gguf"], progress=False, connections=4)
    assert r.sha256 == Hash.of_bytes(data) and r.path.read_bytes() == data and r.name == "m"
    resolves = [p for m, p, _ in hub.requests if "/resolve/" in p]
    assert resolves and all(f"/resolve/{commit}/" in p for p in resolves)  # the commit, not "main"


def test_hf_branch_moved_between_fetches_gets_the_new_bytes(home, hub, tmp_path):
    a = write_gguf(tmp_path / "a.gguf", tensors=1).read_bytes()
    b = write_gguf(tmp_path / "b.gguf", tensors=2).read_bytes()
    old = hub.add_file("org/repo", "m.gguf", a, lfs=True)
    hub.add_file("org/repo", "m.gguf", b, lfs=True)
    [rb] = fetch(["hf://org/repo/m.gguf"], progress=False)
    [ra] = fetch([f"hf://org/repo/m.gguf@{old}"], progress=False)
    assert rb.sha256 == Hash.of_bytes(b) and ra.sha256 == Hash.of_bytes(a)


def test_hf_token_goes_to_the_hub_only_and_is_never_printed(home, tmp_path, monkeypatch):
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    with serve_hub(token="hf_secret123") as hub:
        hub.add_file("org/gated", "m.gguf", data, lfs=True)
        env = {"PYLMSERV_HOME": str(home), "HF_ENDPOINT": hub.url}
        proc = run_cli("-v", "fetch", "hf://org/gated/m.gguf", env=env, cwd=tmp_path)
        assert proc.returncode == 3 and "HF_TOKEN" in proc.stderr  # 401 without a token
        seen = len(hub.requests)
        proc = run_cli("-v", "fetch", "hf://org/gated/m.gguf", env={**env, "HF_TOKEN": "hf_secret123"}, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "hf_secret123" not in proc.stderr + proc.stdout
        second = hub.requests[seen:]
        assert second and all(auth == "Bearer hf_secret123" for _, _, auth in second)


def test_hf_non_lfs_file_has_no_published_hash(home, hub, tmp_path):
    hub.add_file("org/repo", "small.gguf", write_gguf(tmp_path / "s.gguf").read_bytes(), lfs=False)
    with pytest.raises(UsageError, match="publishes no sha256"):
        fetch(["hf://org/repo/small.gguf"], progress=False)


def test_hf_missing_file_and_revision(home, hub, tmp_path):
    hub.add_file("org/repo", "m.gguf", write_gguf(tmp_path / "m.gguf").read_bytes(), lfs=True)
    # A file the Hub does not list is bad input (exit 2) in fetch as in prefetch (one Hub reading).
    with pytest.raises(UsageError, match="'nope.gguf' not found in org/repo"):
        fetch(["hf://org/repo/nope.gguf"], progress=False)
    # A revision that does not exist is bad input (exit 2), as in `pylmserv prefetch`.
    with pytest.raises(UsageError, match="org/repo has no revision 'no-such-branch'"):
        fetch(["hf://org/repo/m.gguf@no-such-branch"], progress=False)


def test_lock_entry_on_huggingface_co_is_served_from_hf_endpoint(home, hub, tmp_path):
    """Lock URLs name https://huggingface.co; HF_ENDPOINT redirects them (mirrors, tests)."""
    data = write_gguf(tmp_path / "m.gguf", pad=1 << 20).read_bytes()
    commit = hub.add_file("org/repo", "m.gguf", data)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text(f'[models.m]\nhf = "org/repo"\nfile = "m.gguf"\nrevision = "{commit}"\n')
    url = f"https://huggingface.co/org/repo/resolve/{commit}/m.gguf"
    Lock(path=proj / "pylmserv.lock").with_entry(LockEntry(
        "models", "m", url, Hash.of_bytes(data), "flat", rev=commit, size=len(data),
        extra={"hf": "org/repo", "file": "m.gguf"})).write()
    [r] = fetch(["m"], config=proj / "pylmserv.toml", lock=proj / "pylmserv.lock", progress=False)
    assert r.path.read_bytes() == data


def test_hf_config_name_trusted_on_first_use_records_canonical_url(home, hub, tmp_path):
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    commit = hub.add_file("org/repo", "m.gguf", data, lfs=True)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text('[models.m]\nhf = "org/repo"\nfile = "m.gguf"\n')
    [r] = fetch(["m"], config=proj / "pylmserv.toml", lock=proj / "pylmserv.lock", trust_on_first_use=True,
                progress=False)
    entry = load_lock(proj / "pylmserv.lock").models["m"]
    assert entry.url == f"https://huggingface.co/org/repo/resolve/{commit}/m.gguf"
    assert entry.rev == commit and entry.hash == Hash.of_bytes(data) and entry.get("hf") == "org/repo"


def test_hf_item_offline_is_served_from_the_store(home, hub, tmp_path, monkeypatch):
    data = write_gguf(tmp_path / "m.gguf", pad=1 << 20).read_bytes()
    hub.add_file("org/repo", "m.gguf", data)
    [first] = fetch(["hf://org/repo/m.gguf"], progress=False)
    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [again] = fetch(["hf://org/repo/m.gguf"], progress=False)
    assert again.path == first.path and again.bytes_downloaded == 0 and len(hub.requests) == seen
    with pytest.raises(UsageError, match="not in the store"):
        fetch(["hf://org/repo/other.gguf"], progress=False)
