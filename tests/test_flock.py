"""pylmserv's own cross-process lock (core/flock.py), against the real other side: the
kernel's flock(2) taken by another process, as the filelock package (and every pylmserv
that used it) takes it on Unix. Planted links and special files: test_adversarial_locks.py."""
from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pylmserv.core.flock import FileLock, LockTimeout
from tests.test_clean_errors import read_only_home  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parent.parent

# A process that takes flock(2) directly, as filelock's UnixFileLock does, and reports it.
RAW_HOLDER = ("import fcntl, os, sys, time\n"
              "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\n"
              "print('held', flush=True)\n"
              "time.sleep(600)\n")
RAW_TRY = ("import fcntl, os, sys\n"
           "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
           "try:\n"
           "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
           "    print('free')\n"
           "except BlockingIOError:\n"
           "    print('busy')\n")


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", RAW_HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()


def _other_process_sees(path: Path) -> str:
    return subprocess.run([sys.executable, "-c", RAW_TRY, str(path)], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def test_a_lock_held_by_another_process_times_out_then_is_taken_once_that_process_dies(tmp_path):
    path = tmp_path / "x.lock"
    proc = _holder(path)
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeout) as err:
            FileLock(path).acquire(timeout=0.3)
        assert time.monotonic() - started >= 0.3
        assert str(path) in str(err.value) and isinstance(err.value, TimeoutError)
        with pytest.raises(LockTimeout):
            FileLock(path, timeout=0).acquire()  # the object's default timeout
    finally:
        _stop(proc)  # SIGKILL: the kernel drops its flock, nothing stale remains
    with FileLock(path, timeout=5) as lock:
        assert lock.is_locked
        assert _other_process_sees(path) == "busy"
    assert not lock.is_locked
    assert _other_process_sees(path) == "free"


def test_a_waiting_lock_is_taken_when_the_holder_lets_go(tmp_path):
    path = tmp_path / "x.lock"
    proc = _holder(path)
    try:
        lock = FileLock(path)
        # Blocks (timeout -1) until the holder dies: kill it from a timer.
        import threading

        threading.Timer(0.3, lambda: proc.send_signal(signal.SIGKILL)).start()
        lock.acquire()
        assert lock.is_locked and _other_process_sees(path) == "busy"
        lock.release()
    finally:
        _stop(proc)


def test_re_entrant_per_object_and_exclusive_between_objects(tmp_path):
    path = tmp_path / "x.lock"
    a, b = FileLock(path), FileLock(path)
    with a:
        with a:  # the same object again: a count, not a deadlock
            assert a.is_locked
        assert a.is_locked  # still held until the outer release
        with pytest.raises(LockTimeout):
            b.acquire(timeout=0)  # another object, same file: excluded, even in one process
    assert not a.is_locked
    with b:
        assert _other_process_sees(path) == "busy"
    a.release()  # releasing an unheld lock is a no-op


def test_the_lock_file_is_kept_and_never_inherited_by_a_child(tmp_path):
    path = tmp_path / "x.lock"
    with FileLock(path):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert path.is_file()  # kept, as filelock keeps it on Unix: removing it would race
        assert _other_process_sees(path) == "free"  # the child holds no copy of the descriptor
    finally:
        child.kill()
        child.wait(30)


def test_only_core_flock_takes_file_locks_and_nothing_imports_filelock():
    """One owner: no module imports the filelock package (its import cost and its O_TRUNC),
    and flock(2) is called only from core/flock.py."""
    offenders = []
    for path in sorted((REPO / "pylmserv").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "filelock" for n in names):
                offenders.append(f"{path.relative_to(REPO)} imports filelock")
            if isinstance(node, ast.Attribute) and node.attr in ("flock", "lockf") and path.name != "flock.py":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} calls {node.attr}")
    assert offenders == []


def test_a_fetch_loads_no_filelock(tmp_path):
    code = ("import sys\n"
            "from pylmserv.core.hashing import Hash\n"
            "from pylmserv.store.blobs import blob_lock\n"
            "with blob_lock(Hash.of_bytes(b'x')):\n"
            "    pass\n"
            "print('filelock' in sys.modules, 'logging' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PYLMSERV_HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_a_missing_directory_is_made_as_filelock_made_it(tmp_path):
    path = tmp_path / "gone" / "deeper" / "x.lock"
    with FileLock(path):
        assert path.is_file()


def test_on_a_read_only_store_an_existing_lock_file_is_still_taken(read_only_home):
    """A read-only bind mount (tests/test_clean_errors.py): flock needs no write access, so a
    lock file already there is opened read-only and locked (another process sees it held);
    one that is not there cannot be made, and says so (EROFS), never a hang or a traceback."""
    import errno

    ro, _, h = read_only_home
    existing = ro / "tmp" / f"{h.hex}.lock"  # left by the fetch that filled the store
    assert existing.is_file()
    with FileLock(existing, timeout=0):
        assert _other_process_sees(ro.parent / "home" / "tmp" / existing.name) == "busy"  # the writable view
    with pytest.raises(OSError) as err:
        FileLock(ro / "tmp" / "new.lock").acquire(timeout=0)
    assert err.value.errno == errno.EROFS
