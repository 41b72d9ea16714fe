"""`pylmserv fetch` and models.fetch: lock names, URLs, TOFU, offline, --dest, --json,
split sets, archives, against real loopback servers."""
from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from pylmserv.store import blobs as store
from pylmserv.pins.config import Lock, LockEntry, load_lock
from pylmserv.core.errors import UsageError, VerificationError
from pylmserv.core.hashing import Hash
from pylmserv.app.fetch_models import fetch
from tests.conftest import run_cli
from tests.test_gguf import write_gguf


@pytest.fixture
def model(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf", pad=2 << 20).read_bytes()


def make_project(tmp_path: Path, models: dict, pinned: dict) -> tuple:
    """pylmserv.toml with `models` {name: url} and a lock pinning `pinned` {name: (url, bytes)}."""
    proj = tmp_path / "proj"
    proj.mkdir(exist_ok=True)
    lines = []
    for name, url in models.items():
        lines += [f"[models.{name}]", f'url = "{url}"', ""]
    (proj / "pylmserv.toml").write_text("\n".join(lines))
    lock = Lock(path=proj / "pylmserv.lock")
    for name, (url, data) in pinned.items():
        lock = lock.with_entry(LockEntry("models", name, url, Hash.of_bytes(data), "flat", size=len(data)))
    lock.write()
    return proj / "pylmserv.toml", proj / "pylmserv.lock"


def test_lock_name_is_fetched_verified_and_linked(home, server, model, tmp_path):
    url = server.add("tiny.gguf", model)
    config, lock = make_project(tmp_path, {"tiny": url}, {"tiny": (url, model)})
    [r] = fetch(["tiny"], config=config, lock=lock, progress=False)
    h = Hash.of_bytes(model)
    assert r.name == "tiny" and r.sha256 == h and r.size == len(model) and r.bytes_downloaded == len(model)
    assert r.path == home / "models" / "tiny" / "tiny.gguf" and r.path.read_bytes() == model
    assert os.path.samefile(r.path, store.blob_path(h))
    assert store.lookup("tiny").path == r.path
    # Second time: from the store, no network.
    server.reset_counters()
    [again] = fetch(["tiny"], config=config, lock=lock, progress=False)
    assert again.bytes_downloaded == 0 and server.requests == []


def test_cli_json_dest_and_offline(home, server, model, tmp_path):
    url = server.add("tiny.gguf", model)
    config, lock = make_project(tmp_path, {"tiny": url}, {"tiny": (url, model)})
    dest = tmp_path / "dest"
    env = {"PYLMSERV_HOME": str(home)}
    proc = run_cli("--config", config, "--lock", lock, "fetch", "tiny", "--json", "--dest", dest, env=env)
    assert proc.returncode == 0, proc.stderr
    [obj] = json.loads(proc.stdout)
    assert {k: obj[k] for k in ("name", "size", "sha256", "bytes_downloaded")} == {
        "name": "tiny", "size": len(model), "sha256": Hash.of_bytes(model).hex, "bytes_downloaded": len(model)}
    assert Path(obj["path"]).read_bytes() == model and obj["seconds"] >= 0
    assert (dest / "tiny.gguf").read_bytes() == model
    # Offline: served from the store; nothing is requested.
    server.reset_counters()
    proc = run_cli("--config", config, "--lock", lock, "fetch", "tiny", "--offline", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["bytes_downloaded"] == 0 and server.requests == []


def test_offline_without_the_blob_is_a_clear_error(home, server, model, tmp_path):
    url = server.add("tiny.gguf", model)
    config, lock = make_project(tmp_path, {"tiny": url}, {"tiny": (url, model)})
    proc = run_cli("--config", config, "--lock", lock, "fetch", "tiny", env={"PYLMSERV_HOME": str(home),
                                                                              "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "not in the store" in proc.stderr and "Traceback" not in proc.stderr
    assert server.requests == []


def test_unpinned_config_name_is_refused_then_trusted_on_first_use(home, server, model, tmp_path):
    url = server.add("tiny.gguf", model)
    config, lock = make_project(tmp_path, {"tiny": url}, {})
    before = lock.read_text()
    proc = run_cli("--config", config, "--lock", lock, "fetch", "tiny", env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2
    assert "no pin in the lock" in proc.stderr and "--trust-on-first-use" in proc.stderr
    assert lock.read_text() == before and server.requests == []
    proc = run_cli("--config", config, "--lock", lock, "fetch", "tiny", "--trust-on-first-use",
                   env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    entry = load_lock(lock).models["tiny"]
    assert entry.hash == Hash.of_bytes(model) and entry.size == len(model) and entry.url == url


def test_url_needs_a_hash_and_accepts_sri_or_hex(home, server, model, tmp_path, monkeypatch):
    url = server.add("tiny.gguf", model)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="no known sha256"):
        fetch([url], progress=False)
    h = Hash.of_bytes(model)
    [r] = fetch([url], sha256=h.sri, progress=False)
    assert r.sha256 == h and r.name == "tiny"
    [r] = fetch([url], sha256=h.hex, progress=False)
    assert r.bytes_downloaded == 0


def test_url_with_wrong_hash_exits_4_and_installs_nothing(home, server, model, tmp_path):
    url = server.add("tiny.gguf", model)
    wrong = Hash.of_bytes(b"not it")
    proc = run_cli("fetch", url, "--sha256", wrong.sri, env={"PYLMSERV_HOME": str(home)}, cwd=tmp_path)
    assert proc.returncode == 4
    assert wrong.hex in proc.stderr and Hash.of_bytes(model).hex in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "blobs" / "sha256").exists() or not any((home / "blobs" / "sha256").iterdir())
    assert not (home / "models" / "tiny").exists()
    assert [p.name for p in (home / "tmp").iterdir() if not p.name.endswith(".lock")] == []


def test_html_page_trusted_on_first_use_fails_the_gguf_check_and_records_nothing(home, server, model, tmp_path):
    url = server.add("tiny.gguf", model)
    server.faults.html = True
    config, lock = make_project(tmp_path, {"tiny": url}, {})
    before = lock.read_text()
    with pytest.raises(VerificationError, match="not a valid GGUF.*HTML"):
        fetch(["tiny"], config=config, lock=lock, trust_on_first_use=True, progress=False)
    assert lock.read_text() == before
    assert not (home / "blobs" / "sha256").exists() or not any((home / "blobs" / "sha256").iterdir())


def test_split_set_is_fetched_whole_and_checked(home, server, tmp_path):
    names = [f"big-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    shards = [write_gguf(tmp_path / n, split=(i, 3)).read_bytes() for i, n in enumerate(names)]
    urls = [server.add(n, d) for n, d in zip(names, shards)]
    config, lock = make_project(tmp_path, {"big": urls[0]}, {})
    [r] = fetch(["big"], config=config, lock=lock, trust_on_first_use=True, progress=False)
    assert [p.name for p in r.files] == names and r.path.name == names[0]
    assert r.size == sum(map(len, shards))
    entry = load_lock(lock).models["big"]
    assert [s["file"] for s in entry.get("shards")] == names[1:]
    # From the lock alone (shards pinned), a fresh store gets all three again.
    import shutil

    shutil.rmtree(home)
    [again] = fetch(["big"], config=config, lock=lock, progress=False)
    assert [p.read_bytes() for p in again.files] == shards


def test_split_set_with_a_missing_shard_fails(home, server, tmp_path):
    names = [f"big-{i:05d}-of-00002.gguf" for i in (1, 2)]
    url = server.add(names[0], write_gguf(tmp_path / names[0], split=(0, 2)).read_bytes())
    config, lock = make_project(tmp_path, {"big": url}, {})
    with pytest.raises(Exception) as exc:
        fetch(["big"], config=config, lock=lock, trust_on_first_use=True, progress=False)
    assert "404" in str(exc.value) and names[1] in str(exc.value)


def tar_gz(members: dict, links: dict = None) -> bytes:
    """A .tar.gz of regular files (name -> bytes) and symlinks (name -> target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def test_archive_is_verified_then_unpacked(home, server, model, tmp_path):
    blob = tar_gz({"pack/tiny.gguf": model, "pack/README": b"hi"})
    url = server.add("pack.tar.gz", blob)
    [r] = fetch([url], sha256=Hash.of_bytes(blob).sri, progress=False, dest=tmp_path / "d")
    assert r.sha256 == Hash.of_bytes(blob)
    assert r.path == home / "models" / "pack" / "pack" / "tiny.gguf" and r.path.read_bytes() == model
    assert (tmp_path / "d" / "pack" / "pack" / "README").read_bytes() == b"hi"
    assert store.lookup("pack").path == r.path
    # Fetched again: the archive is in the store and already unpacked; nothing is sent.
    server.reset_counters()
    [again] = fetch([url], sha256=Hash.of_bytes(blob).sri, progress=False)
    assert again.path == r.path and again.bytes_downloaded == 0 and server.requests == []


@pytest.mark.parametrize("members, links", [
    ({"../evil.gguf": b"x"}, None),
    ({"/tmp/abs-evil.gguf": b"x"}, None),
    ({}, {"link": "../../../../outside"}),
])
def test_archive_traversal_is_refused(home, server, tmp_path, members, links):
    blob = tar_gz(members, links)
    url = server.add("evil.tar.gz", blob)
    with pytest.raises(VerificationError):
        fetch([url], sha256=Hash.of_bytes(blob).sri, progress=False)
    assert not (home / "models" / "evil").exists()
    assert not (home / "evil.gguf").exists() and not (home / "models" / "evil.gguf").exists()
    assert not Path("/tmp/abs-evil.gguf").exists()


def test_zip_traversal_is_refused(home, server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../escape.gguf", b"x")
    blob = buf.getvalue()
    url = server.add("z.zip", blob)
    with pytest.raises(VerificationError):
        fetch([url], sha256=Hash.of_bytes(blob).sri, progress=False)
    assert not (home / "escape.gguf").exists() and not (home / "models" / "escape.gguf").exists()


def test_unknown_name_lists_known_ones(home, server, model, tmp_path):
    url = server.add("tiny.gguf", model)
    config, lock = make_project(tmp_path, {"tiny": url}, {"tiny": (url, model)})
    proc = run_cli("--config", config, "--lock", lock, "fetch", "nope", env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr and "tiny" in proc.stderr


def test_seed_compat_download_models(home, server, model, tmp_path, monkeypatch):
    from pylmserv import download_models

    url = server.add("tiny.gguf", model)
    config, lock = make_project(tmp_path, {"tiny": url}, {"tiny": (url, model)})
    monkeypatch.chdir(config.parent)
    [path] = download_models(["tiny"], tmp_path / "target")
    assert path == tmp_path / "target" / "tiny.gguf" and path.read_bytes() == model


def test_url_trusted_on_first_use_needs_a_writable_lock_and_records_it(home, server, model, tmp_path, monkeypatch):
    url = server.add("tiny.gguf", model)
    monkeypatch.chdir(tmp_path)  # no pylmserv.toml here: the packaged catalog is read-only
    with pytest.raises(UsageError, match="packaged catalog"):
        fetch([url], trust_on_first_use=True, progress=False)
    assert server.requests == []  # refused before downloading
    lock = tmp_path / "my.lock"
    [r] = fetch([url], trust_on_first_use=True, lock=lock, progress=False)
    entry = load_lock(lock).models["tiny"]
    assert entry.url == url and entry.hash == Hash.of_bytes(model) == r.sha256 and entry.size == len(model)
    # Now pinned: a plain fetch of the URL uses the recorded hash.
    [again] = fetch([url], lock=lock, progress=False)
    assert again.bytes_downloaded == 0


def test_progress_bar_on_a_terminal(home, server, model, tmp_path):
    """stderr on a real pseudo-terminal: tqdm draws a bar (aggregate of all connections)."""
    import pty
    import subprocess
    import sys

    url = server.add("tiny.gguf", model)
    server.faults.rate = 1 << 20
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100x24 terminal
    try:
        proc = subprocess.run([sys.executable, "-m", "pylmserv", "fetch", url, "--sha256", Hash.of_bytes(model).hex],
                              stdout=subprocess.PIPE, stderr=slave, timeout=120, cwd=tmp_path,
                              env={**os.environ, "PYLMSERV_HOME": str(home)})
        os.close(slave)
        slave = None
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    text = out.decode(errors="replace")
    assert "tiny.gguf:" in text and "100%" in text and "|" in text


def test_split_set_from_mixed_sets_leaves_no_entry(home, server, tmp_path):
    names = [f"mix-{i:05d}-of-00002.gguf" for i in (1, 2)]
    first = server.add(names[0], write_gguf(tmp_path / names[0], split=(0, 2)).read_bytes())
    server.add(names[1], write_gguf(tmp_path / names[1], split=(1, 3)).read_bytes())  # from another set
    config, lock = make_project(tmp_path, {"mix": first}, {})
    before = lock.read_text()
    with pytest.raises(VerificationError, match="split.count=3"):
        fetch(["mix"], config=config, lock=lock, trust_on_first_use=True, progress=False)
    assert not (home / "models" / "mix").exists() and store.lookup("mix") is None
    assert lock.read_text() == before
