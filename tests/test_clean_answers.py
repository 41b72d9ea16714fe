"""Clean answers where pylmserv crashed or said nothing (issue 18): `add` on a config that
cannot be replaced (both files or neither), `verify` on odd blob files and on a read-only
store, `build` over a `current` that became a directory and with a source `verify` moved
aside, a tar 1,000 directories deep, API answers of any size, `gc --dry-run` that deletes
nothing, `list` that writes nothing, and one name rule in the docs."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import socket
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from pylmserv.core.errors import NetworkError, PylmservError, UsageError
from pylmserv.core.hashing import Hash
from pylmserv.core.names import MAX_NAME
from tests.conftest import run_cli
from tests.test_build_skeleton import ToyBuild
from tests.test_clean_errors import one_clean_line, read_only_home, snapshot  # noqa: F401 (a fixture)
from tests.test_gguf import write_gguf

ROOT = Path(__file__).resolve().parent.parent
DEPTH = 1000


def deep_tar(path: Path, levels: int = DEPTH, leaf: str = "f.txt", data: bytes = b"deep\n") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("top/" + "d/" * levels + leaf)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


# -- add: both files or neither -------------------------------------------------------------

def test_add_when_the_config_cannot_be_replaced_writes_neither(tmp_path, home, monkeypatch):
    from pylmserv.pins import add as add_mod

    model = write_gguf(tmp_path / "m.gguf")
    (tmp_path / "pylmserv.toml").write_text("# mine\n")
    real_replace = os.replace

    def busy(src, dst, *a, **kw):
        if str(dst).endswith("pylmserv.toml"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(PylmservError) as exc:
        add_mod.add(f"file://{model}", config=tmp_path / "pylmserv.toml", via="python")
    assert "cannot write" in exc.value.message and "nothing was changed" in exc.value.message
    assert "bind-mounted" in exc.value.hint
    assert (tmp_path / "pylmserv.toml").read_text() == "# mine\n"
    assert not (tmp_path / "pylmserv.lock").exists()  # the pin that prefetch wrote is undone


def test_add_to_a_bind_mounted_config_is_one_line(tmp_path, home):
    """The real thing: a config bind-mounted on its own (as into a container) cannot be
    renamed over (EBUSY). The lock existed before: it is left exactly as it was."""
    model = write_gguf(tmp_path / "m.gguf")
    proj = tmp_path / "proj"
    proj.mkdir()
    cfg = proj / "pylmserv.toml"
    cfg.write_text("# mine\n")
    source = tmp_path / "outside.toml"
    source.write_text("# mine\n")
    first = run_cli("add", f"file://{write_gguf(tmp_path / 'first.gguf')}", cwd=proj)
    assert first.returncode == 0, first.stderr
    lock_before = (proj / "pylmserv.lock").read_bytes()
    source.write_text(cfg.read_text())
    mounted = subprocess.run(["mount", "--bind", str(source), str(cfg)], capture_output=True, timeout=30)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot bind-mount: {mounted.stderr.decode().strip()}")
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        line = one_clean_line(run_cli("add", f"file://{model}", cwd=proj), code=1)
        assert "Device or resource busy" in line and "nothing was changed" in line
        assert (proj / "pylmserv.lock").read_bytes() == lock_before
        assert "[models.m]" not in cfg.read_text()
    finally:
        subprocess.run(["umount", str(cfg)], capture_output=True, timeout=30)


# -- verify --------------------------------------------------------------------------------

def test_verify_names_odd_blob_files(tmp_path, home):
    blobs = home / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / ("z" * 64)).write_bytes(b"not hex")  # 64 characters, not hex
    (blobs / ("A" * 64)).write_bytes(b"upper case")
    os.symlink(tmp_path / "nowhere", blobs / ("d" * 64))  # dangling
    (blobs / ("e" * 64)).mkdir()
    good = b"good bytes"
    (blobs / Hash.of_bytes(good).hex).write_bytes(good)
    proc = run_cli("verify", "--json")
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    found = {e["name"]: e for e in json.loads(proc.stdout)["entries"]}
    assert found["z" * 64]["detail"].startswith("not a blob") and found["A" * 64]["detail"].startswith("not a blob")
    assert found["d" * 64]["detail"] == "a dangling symlink"
    assert found["e" * 64]["detail"] == "not a regular file"
    assert found[Hash.of_bytes(good).hex]["status"] == "ok"
    assert sorted(p.name for p in blobs.iterdir()) == [Hash.of_bytes(good).hex]  # the rest moved aside
    assert len(list((home / "quarantine").iterdir())) == 4


def test_verify_on_a_read_only_store_reports(read_only_home, tmp_path):
    ro, model, h = read_only_home
    env = {"PYLMSERV_HOME": str(ro)}
    before = snapshot(ro)
    proc = run_cli("verify", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "not recorded" in proc.stderr and "Read-only file system" in proc.stderr
    assert f"ok     blob   {h.hex}" in proc.stdout
    assert snapshot(ro) == before
    writable = tmp_path / "home"  # the same directory, seen writable: rot appears under the mount
    bad = writable / "blobs" / "sha256" / ("c" * 64)
    bad.write_bytes(b"rot")
    proc = run_cli("verify", env=env)
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    assert "left in place, cannot be moved aside: Read-only file system" in proc.stdout
    assert "could not be moved" in proc.stderr
    assert bad.read_bytes() == b"rot"


# -- build ---------------------------------------------------------------------------------

def test_build_over_a_current_that_is_a_directory_is_one_line(home):
    first = ToyBuild().run()
    current = first.current
    current.unlink()
    current.mkdir()
    (current / "mine").write_text("a user's file\n")
    with pytest.raises(UsageError) as exc:
        ToyBuild(tag="other").run()
    assert "is a directory" in exc.value.message and "Move that directory away" in exc.value.hint
    assert (current / "mine").read_text() == "a user's file\n"  # never deleted for the user


class SourcedBuild(ToyBuild):
    """The toy engine with a locked source, as llama.cpp and llamafile have (self.entry)."""

    def __init__(self, entry, **kw):
        self.entry = entry
        super().__init__(tag=entry.hash.sri, **kw)

    def prepare(self):
        from pylmserv.store.trees import ensure_source

        self.calls["prepare"] += 1
        return ensure_source(self.entry)


def test_build_fetches_back_a_source_verify_moved_aside(tmp_path, home):
    from pylmserv.pins.prefetch import prefetch
    from pylmserv.pins.config import load_lock
    from pylmserv.store.integrity import verify_store
    from pylmserv.store.trees import store_path

    archive = deep_tar(tmp_path / "src.tar.gz", levels=3)
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(f'[sources.src]\ntype = "url"\nurl = "file://{archive}"\nunpack = true\n')
    prefetch(config=cfg, via="python")
    entry = load_lock(tmp_path / "pylmserv.lock").sources["src"]
    first = SourcedBuild(entry)
    assert not first.run().cache_hit
    tree = store_path(entry, home)
    (tree / "planted").write_text("tampered\n")
    report = verify_store(home=home)
    assert [f.name for f in report.bad] == ["src"] and not tree.exists()

    again = SourcedBuild(entry)
    result = again.run()
    assert result.cache_hit and again.calls == {"prepare": 0, "compile": 0}  # no rebuild: the build is fine
    assert "fetched again" in result.notes[0]
    assert tree.is_dir() and not (tree / "planted").exists()
    assert verify_store(home=home).bad == []
    third = SourcedBuild(entry).run()
    assert third.notes == ("up to date: nothing to do",)


# -- archives 1,000 directories deep -------------------------------------------------------

@pytest.mark.nix
def test_prefetch_of_a_tar_1000_directories_deep_matches_nix(deep_tmp_path, home, nix):
    archive = deep_tar(deep_tmp_path / "deep.tar.gz")
    proj = deep_tmp_path / "proj"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text(f'[sources.deep]\ntype = "url"\nurl = "file://{archive}"\nunpack = true\n')
    proc = run_cli("prefetch", "--via", "python", cwd=proj)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    pinned = re.search(r'hash = "(sha256-[^"]+)"', (proj / "pylmserv.lock").read_text()).group(1)
    oracle = subprocess.run(["nix-prefetch-url", "--unpack", f"file://{archive}"], capture_output=True,
                            text=True, timeout=300)
    assert oracle.returncode == 0, oracle.stderr
    assert Hash.parse(pinned).nix32 == oracle.stdout.strip()


def test_fetch_verify_gc_of_a_model_archive_1000_directories_deep(deep_tmp_path, home):
    model = write_gguf(deep_tmp_path / "m.gguf").read_bytes()
    archive = deep_tar(deep_tmp_path / "deep-model.tar.gz", leaf="m.gguf", data=model)
    h = Hash.of_bytes(archive.read_bytes())
    proc = run_cli("fetch", f"file://{archive}", "--sha256", h.hex, "--no-progress")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    proc = run_cli("verify")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("gc", "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert not any((home / "models").iterdir())


# -- update: API answers have a size bound ---------------------------------------------------

class HugeAnswer:
    """A loopback HTTP server answering every request 200 with a JSON array far too big
    (declared, or close-delimited with no length); counts what it managed to send."""

    def __init__(self, size: int, declare: bool):
        self.size, self.declare, self.sent = size, declare, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                head += f"Content-Length: {self.size}\r\n" if self.declare else ""
                try:
                    conn.sendall((head + "\r\n[").encode())
                    chunk = b'"tag",' * 10000
                    while self.sent < self.size:
                        conn.sendall(chunk)
                        self.sent += len(chunk)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("declare", [True, False])
def test_github_and_hub_answers_have_a_size_bound(monkeypatch, declare):
    from pylmserv.pins import upstream
    from pylmserv.transfer import hub
    from pylmserv.transfer.http import MAX_API_ANSWER

    server = HugeAnswer(512 << 20, declare)
    try:
        monkeypatch.setenv("PYLMSERV_GITHUB_API", server.url)
        with pytest.raises(NetworkError) as exc:
            upstream.get_list("/repos/o/r/tags", "sources.x")
        assert f"over {MAX_API_ANSWER >> 20} MiB" in exc.value.message and "/repos/o/r/tags" in exc.value.message
        if declare:
            assert "536870912 bytes declared" in exc.value.message
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(NetworkError, match="MiB"):
            hub.api_json("GET", "/api/models/o/r/revision/main", "models.m")
        assert server.sent < 128 << 20  # it stopped reading long before the end
    finally:
        server.close()


# -- gc --dry-run, list: nothing written --------------------------------------------------------

def test_gc_dry_run_keeps_dead_processes_records_and_gc_drops_them(home):
    procs = home / "gcroots" / "procs"
    procs.mkdir(parents=True)
    (procs / "4000000-dead.flock").write_bytes(b"")
    (procs / "4000000-dead").mkdir()
    (procs / "4000000-dead" / "k.lock").write_text("version = 2\n")
    (home / "gcroots" / "locks").mkdir()
    (home / "gcroots" / "locks" / ("0" * 32)).write_text(str(home.parent / "gone" / "pylmserv.lock"))
    before = snapshot(home)
    assert run_cli("gc", "--dry-run").returncode == 0
    assert snapshot(home) == before
    assert run_cli("gc").returncode == 0
    assert list(procs.iterdir()) == [] and list((home / "gcroots" / "locks").iterdir()) == []


def test_list_writes_nothing_into_the_store(tmp_path, home, read_only_home):
    ro, model, h = read_only_home
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text(f'[models.m]\nurl = "file://{model}"\nsha256 = "{h.hex}"\n')
    from pylmserv.pins.config import Lock

    Lock(path=proj / "pylmserv.lock").write()
    writable = tmp_path / "home"
    before = snapshot(writable)
    for env_home in (writable, ro):  # the same store, writable and read-only
        proc = run_cli("list", cwd=proj, env={"PYLMSERV_HOME": str(env_home)})
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert snapshot(writable) == before  # no gc root, no lock file, nothing
    fetch = run_cli("fetch", "m", "--offline", "--no-progress", cwd=proj, env={"PYLMSERV_HOME": str(writable)})
    assert fetch.returncode == 0, fetch.stderr
    assert (writable / "gcroots" / "locks").is_dir()  # fetch roots the lock it stores for, visibly


# -- one name rule -------------------------------------------------------------------------------

def test_the_docs_state_the_name_rule_of_the_code():
    for page in ("docs/pins.md", "docs/security.md"):
        text = (ROOT / page).read_text()
        lengths = set(re.findall(r"(?:1 to|at most)\s+(\d+)\s+characters", text.replace("\n", " ")))
        assert lengths == {str(MAX_NAME)}, (page, lengths)
