"""Links, directories and FIFOs planted where pylmserv keeps its lock files (issue 18).
filelock opens a lock file with O_TRUNC and, before 3.20.1, follows a link there: a link
planted at tmp/<hex>.lock would truncate a file outside the home. Every lock site removes
such a link as a link (the command then works) and names anything else in one line."""
from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

import pytest

from pylmserv.core.errors import UsageError
from pylmserv.core.fsutil import lock_file_path
from tests.conftest import run_cli
from tests.test_clean_errors import one_clean_line
from tests.test_gguf import write_gguf

PRECIOUS = "precious, outside the home\n"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "outside" / "victim"
    path.parent.mkdir()
    path.write_text(PRECIOUS)
    return path


@pytest.fixture
def old_filelock(monkeypatch):
    """filelock as every release before 3.20.1 opens its file: O_CREAT|O_TRUNC, links followed."""
    import fcntl

    import filelock

    class OldFileLock:
        def __init__(self, path, timeout=-1, **kw):
            self.lock_file, self.fd = str(path), None

        def acquire(self, timeout=None, **kw):
            self.fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return self

        def release(self, **kw):
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

        def __enter__(self):
            return self.acquire()

        def __exit__(self, *a):
            self.release()

    monkeypatch.setattr(filelock, "FileLock", OldFileLock)


def test_lock_file_path_removes_a_link_and_refuses_a_directory_or_fifo(tmp_path, victim):
    link = tmp_path / "a.lock"
    os.symlink(victim, link)
    assert lock_file_path(link) == str(link)
    assert not os.path.lexists(link) and victim.read_text() == PRECIOUS
    (tmp_path / "d.lock").mkdir()
    with pytest.raises(UsageError, match="a directory is where pylmserv keeps a lock file"):
        lock_file_path(tmp_path / "d.lock")
    os.mkfifo(tmp_path / "f.lock")
    with pytest.raises(UsageError, match="special file"):
        lock_file_path(tmp_path / "f.lock")
    (tmp_path / "r.lock").write_text("")
    assert lock_file_path(tmp_path / "r.lock") == str(tmp_path / "r.lock")


def test_blob_lock_never_truncates_through_a_planted_link(tmp_path, home, victim, old_filelock):
    from pylmserv.core.hashing import Hash
    from pylmserv.store.blobs import blob_lock
    from pylmserv.store.layout import tmp_dir

    h = Hash.of_bytes(b"x")
    os.symlink(victim, tmp_dir() / f"{h.hex}.lock")
    with blob_lock(h):
        pass
    assert victim.read_text() == PRECIOUS


def test_lock_writer_and_project_lock_never_truncate_through_a_planted_link(tmp_path, home, victim, old_filelock):
    from pylmserv.pins import lockfile
    from pylmserv.pins.configedit import project_lock
    from pylmserv.store.layout import tmp_dir

    lock_path = tmp_path / "proj" / "pylmserv.lock"
    lock_path.parent.mkdir()
    os.symlink(victim, lock_path.with_name(".pylmserv.lock.flock"))
    with project_lock(lock_path):
        pass
    key = hashlib.sha256(str(lock_path.resolve()).encode()).hexdigest()[:16]
    os.symlink(victim, tmp_dir() / f"lockfile-{key}.lock")
    lockfile.update(lock_path, lambda lock: lock)
    assert victim.read_text() == PRECIOUS


def _project(tmp_path: Path):
    model = write_gguf(tmp_path / "m.gguf")
    proj = tmp_path / "proj"
    proj.mkdir()
    run_cli("add", f"file://{model}", "--via", "python", cwd=proj, check=True)
    m = re.search(r'hash = "sha256-([^"]+)"', (proj / "pylmserv.lock").read_text())
    return proj, base64.b64decode(m.group(1)).hex()


def test_fetch_works_through_a_link_planted_at_its_blob_lock(tmp_path, home, victim):
    proj, hexdigest = _project(tmp_path)
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    os.symlink(victim, home / "tmp" / f"{hexdigest}.lock")
    proc = run_cli("fetch", "m", cwd=proj)
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == PRECIOUS
    assert (home / "blobs" / "sha256" / hexdigest).is_file()


def test_fetch_with_a_directory_at_its_blob_lock_is_one_line(tmp_path, home):
    proj, hexdigest = _project(tmp_path)
    (home / "tmp" / f"{hexdigest}.lock").mkdir(parents=True)
    msg = one_clean_line(run_cli("fetch", "m", cwd=proj), 2)
    assert "lock file" in msg


def test_add_works_through_a_link_planted_at_the_project_lock(tmp_path, home, victim):
    model = write_gguf(tmp_path / "m.gguf")
    proj = tmp_path / "proj"
    proj.mkdir()
    os.symlink(victim, proj / ".pylmserv.lock.flock")
    proc = run_cli("add", f"file://{model}", "--via", "python", cwd=proj)
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == PRECIOUS
