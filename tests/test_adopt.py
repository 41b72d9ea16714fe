"""Adopt: a locked model another tool already downloaded is taken, verified, without a
download and without a second copy.

The Hugging Face cache here is written by the real huggingface_hub (hf_hub_download against
the loopback Hub stand-in), not by hand. The ollama store follows ollama's source
(ollama/ollama manifest/paths.go @ c73feaf73de0a6b2874108e5b71efa9c7375dec7: BlobsPath
turns "sha256:<hex>" into blobs/sha256-<hex>). "No download" is proven by running pylmserv
in a network namespace with no network at all (`unshare -n`), "no copy" by the inode.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pylmserv.core.hashing import Hash
from pylmserv.pins.config import Lock
from pylmserv.pins.lock import FilePin, HfPin
from pylmserv.store import adopt
from tests.support.hubstub import serve_hub
from tests.test_gguf import write_gguf

REPO = Path(__file__).resolve().parent.parent
TOOL_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "OLLAMA_MODELS", "LLAMA_CACHE", "XDG_CACHE_HOME",
            adopt.ADOPT_FROM_ENV, adopt.NO_ADOPT_ENV, "HF_HUB_OFFLINE", "PYLMSERV_OFFLINE")


@pytest.fixture
def tools(tmp_path, monkeypatch):
    """Every other tool's place under tmp_path (HOME too: nothing of this machine's real caches)."""
    for k in TOOL_ENV:
        monkeypatch.delenv(k, raising=False)
    places = {"home": tmp_path / "user", "hf": tmp_path / "hf", "ollama": tmp_path / "ollama",
              "llama.cpp": tmp_path / "llamacpp"}
    monkeypatch.setenv("HOME", str(places["home"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(places["hf"]))
    monkeypatch.setenv("OLLAMA_MODELS", str(places["ollama"]))
    monkeypatch.setenv("LLAMA_CACHE", str(places["llama.cpp"]))
    places["lmstudio"] = places["home"] / ".lmstudio" / "models"
    return places


def hf_download(cache: Path, repo: str, filename: str, data: bytes) -> tuple:
    """Put `data` in the HF cache at `cache` the way huggingface_hub does: hf_hub_download from
    the loopback Hub. Returns (commit, the snapshot path it returned)."""
    import huggingface_hub

    with serve_hub() as hub:
        commit = hub.add_file(repo, filename, data, lfs=True)
        old = os.environ.get("HF_ENDPOINT")
        os.environ["HF_ENDPOINT"] = hub.url
        try:
            # constants are read at import: pass the endpoint explicitly as well
            path = huggingface_hub.hf_hub_download(repo, filename, revision=commit, cache_dir=str(cache),
                                                   endpoint=hub.url)
        finally:
            if old is None:
                os.environ.pop("HF_ENDPOINT", None)
            else:
                os.environ["HF_ENDPOINT"] = old
    return commit, Path(path)


def write_project(proj: Path, entries) -> tuple:
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "pylmserv.toml").write_text("")
    lock = Lock(path=proj / "pylmserv.lock")
    for e in entries:
        lock = lock.with_entry(e)
    lock.write()
    return proj / "pylmserv.toml", proj / "pylmserv.lock"


def hf_pin(name, repo, file, commit, data) -> HfPin:
    return HfPin(kind="models", name=name, url=f"https://huggingface.co/{repo}/resolve/{commit}/{file}",
                 hash=Hash.of_bytes(data), size=len(data), rev=commit, hf=repo, file=file, revision="main")


def url_pin(name, url, data) -> FilePin:
    return FilePin(kind="models", name=name, url=url, hash=Hash.of_bytes(data), size=len(data))


def unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def run_offline(*args, env, cwd) -> subprocess.CompletedProcess:
    """`python -m pylmserv ARGS` in a network namespace with no network (not even loopback up)."""
    if not unshare_available():
        if os.environ.get("CI"):
            pytest.fail("`unshare -n` is needed (util-linux, root or user namespaces)")
        pytest.skip("`unshare -n` is not available here")
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run(["unshare", "-n", sys.executable, "-m", "pylmserv", *map(str, args)], env=full,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def inode(path) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def blob(home: Path, data: bytes) -> Path:
    return home / "blobs" / "sha256" / Hash.of_bytes(data).hex


# -- the done-when cases -----------------------------------------------------------------------------

def test_model_in_the_hf_cache_is_fetched_with_no_network_and_no_copy(home, tools, tmp_path):
    data = write_gguf(tmp_path / "m.gguf", pad=1 << 16).read_bytes()
    commit, snapshot = hf_download(tools["hf"], "org/repo", "m.gguf", data)
    hf_blob = tools["hf"] / "models--org--repo" / "blobs" / Hash.of_bytes(data).hex
    assert snapshot.resolve() == hf_blob.resolve()  # the library's own layout, as adopt reads it
    before = {p: (p.stat().st_mode, p.stat().st_mtime_ns) for p in tools["hf"].rglob("*") if not p.is_symlink()}
    config, lock = write_project(tmp_path / "proj", [hf_pin("m", "org/repo", "m.gguf", commit, data)])
    proc = run_offline("fetch", "m", env={"PYLMSERV_HOME": str(home)}, cwd=tmp_path / "proj")
    assert proc.returncode == 0, proc.stderr
    assert "adopted from hf" in proc.stderr and "by hardlink (0 bytes copied)" in proc.stderr
    assert inode(blob(home, data)) == inode(hf_blob)  # the same inode: not one byte copied
    assert inode(home / "models" / "m" / "m.gguf") == inode(hf_blob)
    after = {p: (p.stat().st_mode, p.stat().st_mtime_ns) for p in tools["hf"].rglob("*") if not p.is_symlink()}
    assert after == before  # the other tool's files: not written, not chmod-ed


def test_model_in_ollamas_store_is_fetched_with_no_network_and_no_copy(home, tools, tmp_path):
    data = write_gguf(tmp_path / "m.gguf", pad=1 << 16).read_bytes()
    ob = tools["ollama"] / "blobs" / f"sha256-{Hash.of_bytes(data).hex}"
    ob.parent.mkdir(parents=True)
    ob.write_bytes(data)
    # A URL pin (not on the Hub): only the digest-named blob can match it.
    config, lock = write_project(tmp_path / "proj", [url_pin("m", "https://example.invalid/x/m.gguf", data)])
    proc = run_offline("fetch", "m", env={"PYLMSERV_HOME": str(home)}, cwd=tmp_path / "proj")
    assert proc.returncode == 0, proc.stderr
    assert "adopted from ollama" in proc.stderr
    assert inode(blob(home, data)) == inode(ob)
    assert ob.read_bytes() == data and ob.exists()


def test_no_adopt_downloads_instead(home, tools, tmp_path):
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    ob = tools["ollama"] / "blobs" / f"sha256-{Hash.of_bytes(data).hex}"
    ob.parent.mkdir(parents=True)
    ob.write_bytes(data)
    write_project(tmp_path / "proj", [url_pin("m", "http://127.0.0.1:9/m.gguf", data)])
    proc = run_offline("fetch", "--no-adopt", "--offline", "m", env={"PYLMSERV_HOME": str(home)},
                       cwd=tmp_path / "proj")
    assert proc.returncode != 0 and "not in the store" in proc.stderr
    assert not blob(home, data).exists()
    proc = run_offline("fetch", "--offline", "m", env={"PYLMSERV_HOME": str(home), adopt.NO_ADOPT_ENV: "1"},
                       cwd=tmp_path / "proj")
    assert proc.returncode != 0 and not blob(home, data).exists()
    proc = run_offline("fetch", "--offline", "m", env={"PYLMSERV_HOME": str(home)}, cwd=tmp_path / "proj")
    assert proc.returncode == 0 and inode(blob(home, data)) == inode(ob)  # the same, adoption on


# -- hostile candidates --------------------------------------------------------------------------------

def test_right_name_wrong_bytes_is_skipped_and_said(home, tools, tmp_path):
    good = write_gguf(tmp_path / "good.gguf", tensors=2).read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0xFF  # same size, same name, one byte off
    for where in (tools["lmstudio"] / "org" / "repo" / "m.gguf", tools["llama.cpp"] / "org_repo_m.gguf"):
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(bytes(bad))
    write_project(tmp_path / "proj", [hf_pin("m", "org/repo", "m.gguf", "c" * 40, good)])
    proc = run_offline("fetch", "--offline", "m", env={"PYLMSERV_HOME": str(home)}, cwd=tmp_path / "proj")
    assert proc.returncode != 0
    assert proc.stderr.count("other bytes") == 2, proc.stderr  # both candidates named, neither taken
    assert not blob(home, good).exists() and not (home / "models" / "m").exists()
    # The right bytes in a user folder (adopt-from, listed in the environment) are taken.
    user = tmp_path / "mine" / "deep"
    user.mkdir(parents=True)
    (user / "m.gguf").write_bytes(good)
    proc = run_offline("fetch", "--offline", "m", env={"PYLMSERV_HOME": str(home),
                                                       adopt.ADOPT_FROM_ENV: str(tmp_path / "mine")},
                       cwd=tmp_path / "proj")
    assert proc.returncode == 0, proc.stderr
    assert inode(blob(home, good)) == inode(user / "m.gguf")
    assert Hash.of_bytes(blob(home, good).read_bytes()) == Hash.of_bytes(good)


def test_symlink_in_another_tools_cache_pointing_elsewhere_is_not_followed(home, tools, tmp_path):
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    outside = tmp_path / "elsewhere" / "m.gguf"
    outside.parent.mkdir()
    outside.write_bytes(data)  # even the right bytes: a link out of ollama's folder is not ollama's file
    ob = tools["ollama"] / "blobs" / f"sha256-{Hash.of_bytes(data).hex}"
    ob.parent.mkdir(parents=True)
    ob.symlink_to(outside)
    want = adopt.Want(Hash.of_bytes(data), len(data), "m.gguf")
    outcome = adopt.find(want, adopt.default_places(), home)
    assert outcome.found is None
    [s] = outcome.skipped
    assert s.path == ob and "leaves ollama's folder" in s.reason
    assert not blob(home, data).exists()
    # A symlink inside the tool's folder (the HF cache's snapshots are such links) is fine.
    os.unlink(ob)
    real = tools["ollama"] / "blobs" / "real-file"
    shutil.copyfile(outside, real)
    ob.symlink_to(real)
    found = adopt.find(want, adopt.default_places(), home).found
    assert found is not None and found.method == "hardlink" and inode(blob(home, data)) == inode(real)


def test_a_file_being_written_while_it_is_read_is_not_adopted(home, tools, tmp_path, monkeypatch):
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    ob = tools["ollama"] / "blobs" / f"sha256-{Hash.of_bytes(data).hex}"
    ob.parent.mkdir(parents=True)
    ob.write_bytes(data)  # the final size already, still being written (ollama writes in place? a user's cp)
    real_hash = adopt._hash_fd

    def writer_still_writing(fd, out=None):
        with open(ob, "r+b") as f:  # another process writes the file while we read it
            f.seek(100)
            f.write(b"\0" * 8)
            f.flush()
            os.fsync(f.fileno())
        os.utime(ob, ns=(1, 1))  # and its mtime moves, as any write's does
        return real_hash(fd, out)

    monkeypatch.setattr(adopt, "_hash_fd", writer_still_writing)
    outcome = adopt.find(adopt.Want(Hash.of_bytes(data), len(data), "m.gguf"), adopt.default_places(), home)
    assert outcome.found is None
    assert any("changed while it was read" in s.reason or "other bytes" in s.reason for s in outcome.skipped)
    assert not blob(home, data).exists()
    assert not list((home / "tmp").glob("adopt-*"))  # no staging left behind


@contextlib.contextmanager
def as_nobody():
    """Drop the effective uid for the block (root ignores file modes); a no-op when not root."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_an_unreadable_directory_is_skipped_and_the_search_goes_on(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="pylmserv-adopt-"))
    try:
        os.chmod(base, 0o755)
        data = write_gguf(tmp_path / "m.gguf").read_bytes()
        hexd = Hash.of_bytes(data).hex
        locked = base / "hf" / "models--org--locked"
        (locked / "blobs").mkdir(parents=True)
        (locked / "blobs" / hexd).write_bytes(data)
        user = base / "user"
        (user / "a" / "closed").mkdir(parents=True)
        (user / "a" / "closed" / "m.gguf").write_bytes(data)
        (user / "b").mkdir()
        (user / "b" / "m.gguf").write_bytes(data)
        for p in [base, *base.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(locked, 0o000)
        os.chmod(user / "a" / "closed", 0o000)
        places = [adopt.Place("hf", base / "hf"), adopt.Place("user", user)]
        want = adopt.Want(Hash.of_bytes(data), len(data), "m.gguf", "org/locked")
        with as_nobody():
            outcome = adopt.find(want, places, base / "home", adopt=False)  # dry run: reads only
        assert outcome.found is not None and outcome.found.path == user / "b" / "m.gguf"
        reasons = {s.path: s.reason for s in outcome.skipped}
        assert "Permission denied" in reasons[locked / "blobs" / hexd], reasons  # the HF repo folder
        assert "folder cannot be read" in reasons[user / "a" / "closed"], reasons  # the user's folder
    finally:
        for p in [base, *base.rglob("*")]:
            with contextlib.suppress(OSError):
                os.chmod(p, 0o755)
        shutil.rmtree(base, ignore_errors=True)


# -- the command ------------------------------------------------------------------------------------------

def test_adopt_command_dry_run_reports_then_adopts(home, tools, tmp_path):
    import json

    a = write_gguf(tmp_path / "a.gguf", tensors=1).read_bytes()
    b = write_gguf(tmp_path / "b.gguf", tensors=2).read_bytes()
    commit, _ = hf_download(tools["hf"], "org/a", "a.gguf", a)
    lm = tools["lmstudio"] / "someone" / "b-GGUF" / "b.gguf"
    lm.parent.mkdir(parents=True)
    lm.write_bytes(b)
    write_project(tmp_path / "proj", [hf_pin("a", "org/a", "a.gguf", commit, a),
                                      url_pin("b", "https://example.invalid/b.gguf", b),
                                      url_pin("c", "https://example.invalid/c.gguf", b"GGUF" + bytes(60))])
    env = {"PYLMSERV_HOME": str(home)}
    proc = run_offline("adopt", "--dry-run", "--json", env=env, cwd=tmp_path / "proj")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by = {m["name"]: m for m in doc["models"]}
    assert by["a"]["files"][0]["found"]["tool"] == "hf" and by["b"]["files"][0]["found"]["tool"] == "lmstudio"
    assert by["c"]["files"][0]["state"] == "missing"
    assert doc["saved"] == len(a) + len(b) and doc["dry_run"] is True
    assert not (home / "blobs").exists() or not any((home / "blobs").rglob("*"))  # a dry run links nothing
    proc = run_offline("adopt", env=env, cwd=tmp_path / "proj")
    assert proc.returncode == 0, proc.stderr
    assert "hardlink, 0 bytes copied" in proc.stdout and "not found" in proc.stdout
    assert inode(home / "models" / "b" / "b.gguf") == inode(lm)
    assert inode(home / "models" / "a" / "a.gguf") == inode(tools["hf"] / "models--org--a" / "blobs" / Hash.of_bytes(a).hex)


def test_llama_cpp_old_flat_cache_file_is_adopted(home, tools, tmp_path):
    """llama.cpp's cache before its move to the HF layout: LLAMA_CACHE/OWNER_REPO_FILE with the
    file's '/' made '_' (ggml-org/llama.cpp common/hf-cache.cpp @
    6fd16ba05c88846ba5e6d8fd053c6230509d5ffc, make_old_cache_filename), beside an .etag file."""
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    old = tools["llama.cpp"] / "org_repo_sub_m.gguf"
    old.parent.mkdir(parents=True)
    old.write_bytes(data)
    (tools["llama.cpp"] / "org_repo_sub_m.gguf.etag").write_text('"x"')
    want = adopt.Want(Hash.of_bytes(data), len(data), "m.gguf", "org/repo")
    found = adopt.find(want, adopt.default_places(), home).found
    assert found is not None and found.tool == "llama.cpp" and found.method == "hardlink"
    assert inode(blob(home, data)) == inode(old)


def test_another_filesystem_is_copied_hashed_as_written_and_said(home, tools, tmp_path):
    """/dev/shm (tmpfs) is another filesystem than the store: no hard link (EXDEV), no reflink
    across filesystems, so a copy - our own inode, read-only - and the source is untouched."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        if os.environ.get("CI"):
            pytest.fail("/dev/shm on another filesystem than the test's tmp is needed")
        pytest.skip("no second filesystem at /dev/shm")
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    other = Path(tempfile.mkdtemp(dir=shm, prefix="pylmserv-adopt-"))
    try:
        src = other / "m.gguf"
        src.write_bytes(data)
        os.chmod(src, 0o640)
        want = adopt.Want(Hash.of_bytes(data), len(data), "m.gguf")
        found = adopt.find(want, [adopt.Place("user", other)], home).found
        assert found is not None and found.method == "copy" and found.bytes_copied == len(data)
        assert inode(blob(home, data)) != inode(src) and blob(home, data).read_bytes() == data
        assert oct(blob(home, data).stat().st_mode & 0o777) == oct(0o444)  # our copy: read-only
        assert oct(src.stat().st_mode & 0o777) == oct(0o640) and src.read_bytes() == data  # theirs: untouched
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_adopt_from_in_the_config(home, tools, tmp_path):
    from pylmserv.pins.config import load_config

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pylmserv.toml").write_text('adopt-from = ["../gguf", "/srv/x"]\n')
    cfg = load_config(tmp_path / "p" / "pylmserv.toml")
    assert cfg.adopt_from == (tmp_path / "p" / "../gguf", Path("/srv/x"))
    places = adopt.default_places(cfg.adopt_from)
    assert [p.tool for p in places][-2:] == ["user", "user"]
    (tmp_path / "p" / "pylmserv.toml").write_text('adopt-from = "not a list"\n')
    from pylmserv.core.errors import ConfigError

    with pytest.raises(ConfigError, match="adopt-from must be a list"):
        load_config(tmp_path / "p" / "pylmserv.toml")
