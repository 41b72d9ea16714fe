"""The content-addressed store: blobs, named entries, links, locks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pylmserv.store import blobs as store
from pylmserv.core.errors import UsageError
from pylmserv.core.hashing import Hash
from pylmserv.store.layout import CACHEDIR_TAG


def _install(home, data: bytes, name="x"):
    tmp = store.temp_path(name, home)
    tmp.write_bytes(data)
    h = Hash.of_bytes(data)
    return h, store.install_blob(tmp, h, home)


def test_install_blob_is_content_addressed_read_only_and_tagged(home):
    h, path = _install(home, b"model bytes")
    assert path == home / "blobs" / "sha256" / h.hex == store.blob_path(h)
    assert path.read_bytes() == b"model bytes"
    assert not os.access(path, os.W_OK) or os.geteuid() == 0
    assert (path.stat().st_mode & 0o777) == 0o444
    assert store.has_blob(h) and store.has_blob(h, size=11) and not store.has_blob(h, size=12)
    assert (home / "CACHEDIR.TAG").read_text() == CACHEDIR_TAG


def test_same_bytes_are_stored_once(home):
    h, first = _install(home, b"same")
    h2, second = _install(home, b"same", name="other")
    assert h == h2 and first == second
    assert [p.name for p in (home / "blobs" / "sha256").iterdir()] == [h.hex]
    assert not any(p.name.endswith(".tmp") for p in (home / "tmp").iterdir())
    assert store.store_size() == 4


@pytest.mark.parametrize("mode", ["hardlink", "symlink", "copy"])
def test_link_named_modes(home, mode):
    h, blob = _install(home, b"gguf-ish")
    path = store.link_named("tiny", h, "tiny.gguf", mode=mode)
    assert path == home / "models" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == b"gguf-ish"
    if mode == "hardlink":
        assert os.path.samefile(path, blob) and not path.is_symlink()
    elif mode == "symlink":
        assert path.is_symlink() and os.readlink(path) == str(blob)
    else:
        assert not path.is_symlink() and not os.path.samefile(path, blob)
    entry = store.lookup("tiny")
    assert entry is not None and entry.path == path and entry.files[0].sha256 == h and entry.size == 8


def test_link_mode_from_environment(home, monkeypatch):
    h, blob = _install(home, b"abc")
    monkeypatch.setenv(store.LINK_MODE_ENV, "symlink")
    assert store.link_named("a", h, "a.gguf").is_symlink()
    monkeypatch.setenv(store.LINK_MODE_ENV, "bogus")
    with pytest.raises(UsageError, match="unknown link mode"):
        store.link_named("b", h, "b.gguf")


def test_split_entry_keeps_shard_order_and_lookup_detects_damage(home):
    names = ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    hashes = [_install(home, n.encode())[0] for n in names]
    for n, h in zip(reversed(names), reversed(hashes)):
        store.link_named("m", h, n)
    store.set_order("m", names)
    entry = store.lookup("m")
    assert [f.path.name for f in entry.files] == names and entry.path.name == names[0]
    (home / "models" / "m" / names[1]).unlink()
    assert store.lookup("m") is None  # a missing shard is not an entry
    assert store.lookup("never-fetched") is None


@pytest.mark.parametrize("bad", ["", "..", "a/b", ".hidden"])
def test_bad_names_are_refused(home, bad):
    h, _ = _install(home, b"x")
    with pytest.raises(UsageError):
        store.link_named(bad, h, "f.gguf")


def test_blob_lock_from_a_killed_process_is_recovered(home):
    """A holder SIGKILLed while holding the per-blob lock does not block the next one."""
    h = Hash.of_bytes(b"locked")
    code = ("import sys,time; from pylmserv.store import blobs as store; from pylmserv.core.hashing import Hash\n"
            "with store.blob_lock(Hash.of_bytes(b'locked')):\n print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYLMSERV_HOME": str(home)})
    try:
        assert proc.stdout.readline().strip() == "held"
        from pylmserv.core.flock import FileLock, LockTimeout

        with pytest.raises(LockTimeout):  # really held by the other process
            FileLock(str(home / "tmp" / f"{h.hex}.lock")).acquire(timeout=0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        lock = FileLock(str(home / "tmp" / f"{h.hex}.lock"))
        lock.acquire(timeout=5)  # Timeout here would mean a stale lock
        lock.release()
        with store.blob_lock(h):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
