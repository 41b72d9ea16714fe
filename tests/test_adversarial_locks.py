"""Links, directories and FIFOs planted where pylmserv keeps its lock files (issue 18).
The filelock package opened a lock file with O_TRUNC and, before 3.20.1, through a link:
a link planted at tmp/<hex>.lock would have truncated a file outside the home. pylmserv's
own lock (core/flock.py) removes such a link as a link (the command then works), never
opens through one or truncates, and names anything else in one line. Every lock site."""
from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

import pytest

from pylmserv.core.errors import UsageError
from pylmserv.core.flock import FileLock
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


def test_the_lock_removes_a_planted_link_and_refuses_a_directory_or_fifo(tmp_path, victim):
    link = tmp_path / "a.lock"
    os.symlink(victim, link)
    with FileLock(link):
        assert os.path.isfile(link) and not os.path.islink(link)
    assert victim.read_text() == PRECIOUS
    (tmp_path / "d.lock").mkdir()
    with pytest.raises(UsageError, match="a directory is where pylmserv keeps a lock file"):
        FileLock(tmp_path / "d.lock").acquire(timeout=0)
    os.mkfifo(tmp_path / "f.lock")
    with pytest.raises(UsageError, match="special file"):
        FileLock(tmp_path / "f.lock").acquire(timeout=0)
    (tmp_path / "r.lock").write_text("left by someone")
    with FileLock(tmp_path / "r.lock"):
        pass
    assert (tmp_path / "r.lock").read_text() == "left by someone"  # never truncated


def test_a_link_swapped_in_after_the_look_is_refused_not_followed(tmp_path, victim, monkeypatch):
    """The race the lstat cannot close: the open itself never follows a link (O_NOFOLLOW)."""
    from pylmserv.core import flock

    path = tmp_path / "race.lock"
    real_lstat = os.lstat

    planted = []

    def lstat_then_swap(p, *a, **kw):
        try:
            return real_lstat(p, *a, **kw)
        finally:
            if str(p) == str(path) and not planted:
                planted.append(os.symlink(victim, path))  # between the look and the open

    monkeypatch.setattr(flock.os, "lstat", lstat_then_swap)
    with pytest.raises(OSError):
        FileLock(path).acquire(timeout=0)
    assert planted and os.path.islink(path) and victim.read_text() == PRECIOUS


def test_blob_lock_never_truncates_through_a_planted_link(tmp_path, home, victim):
    from pylmserv.core.hashing import Hash
    from pylmserv.store.blobs import blob_lock
    from pylmserv.store.layout import tmp_dir

    h = Hash.of_bytes(b"x")
    os.symlink(victim, tmp_dir() / f"{h.hex}.lock")
    with blob_lock(h):
        pass
    assert victim.read_text() == PRECIOUS


def test_lock_writer_and_project_lock_never_truncate_through_a_planted_link(tmp_path, home, victim):
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
