"""Real processes: SIGKILL a running `python -m pylmserv fetch` and resume; three
concurrent fetches of one model download it once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pylmserv.store import blobs as store
from pylmserv.pins.config import Lock, LockEntry
from pylmserv.core.hashing import Hash
from tests.conftest import run_cli
from tests.support.faultserver import fault_server
from tests.test_download import kept_bytes
from tests.test_gguf import write_gguf

MB = 1 << 20


def _project(tmp_path: Path, url: str, data: bytes):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text(f'[models.tiny]\nurl = "{url}"\n')
    Lock(path=proj / "pylmserv.lock").with_entry(
        LockEntry("models", "tiny", url, Hash.of_bytes(data), "flat", size=len(data))).write()
    return proj / "pylmserv.toml", proj / "pylmserv.lock"


def _state_done(home: Path) -> int:
    """Bytes the running fetch has recorded as done; 0 before its state is first written."""
    try:
        return kept_bytes(home / "tmp")
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_at_half_then_resume_resends_little(home, tmp_path):
    data = write_gguf(tmp_path / "tiny.gguf", pad=8 * MB).read_bytes()
    with fault_server() as server:
        url = server.add("tiny.gguf", data)
        server.faults.rate = 512 * 1024  # per connection: 4 connections take about 4 s
        config, lock = _project(tmp_path, url, data)
        cmd = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock),
               "fetch", "tiny", "--connections", "4"]
        env = {**os.environ, "PYLMSERV_HOME": str(home)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while _state_done(home) < len(data) // 2:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "download never reached 50%"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        first = server.bytes_sent  # once the dead client's connections have ended there
        assert not store.has_blob(Hash.of_bytes(data), home)
        server.faults.rate = None
        result = run_cli("--config", config, "--lock", lock, "fetch", "tiny", "--json", env={"PYLMSERV_HOME": str(home)})
        assert result.returncode == 0, result.stderr
        [obj] = json.loads(result.stdout)
        assert Path(obj["path"]).read_bytes() == data
        total = server.bytes_sent
        resent = total - len(data)
        # Only what was in flight or not yet recorded at the kill is sent twice.
        assert first >= len(data) // 2
        assert 0 <= resent <= 0.15 * len(data), (first, total, len(data))
        assert obj["bytes_downloaded"] == total - first - 1  # less the probe byte (headers only are read)
        assert "resuming" in result.stderr


def test_three_concurrent_fetches_download_once(home, tmp_path):
    data = write_gguf(tmp_path / "tiny.gguf", pad=4 * MB).read_bytes()
    with fault_server() as server:
        url = server.add("tiny.gguf", data)
        server.faults.rate = 2 * MB
        config, lock = _project(tmp_path, url, data)
        cmd = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock),
               "fetch", "tiny", "--json"]
        env = {**os.environ, "PYLMSERV_HOME": str(home)}
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
        results = [json.loads(o)[0] for o, _ in outs]
        assert all(Path(r["path"]).read_bytes() == data for r in results)
        assert sorted(r["bytes_downloaded"] for r in results) == [0, 0, len(data)]
        assert server.bytes_sent == len(data) + 1  # one download (+ its 1-byte probe)
        assert [p.name for p in (home / "blobs" / "sha256").iterdir()] == [Hash.of_bytes(data).hex]
