"""Shared fixtures: an isolated PYLMSERV_HOME, real Nix configured for offline root use,
and a loopback HTTP server for any directory."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.httpserver import serve_directory
from tests.support.nixenv import nix_env, have_nix

REPO = Path(__file__).resolve().parent.parent

# Every `python -m pylmserv` the tests start imports this checkout, whatever cwd they run
# in and wherever an editable install of pylmserv on this machine happens to point.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty pylmserv home for this test."""
    path = tmp_path / "home"
    monkeypatch.setenv("PYLMSERV_HOME", str(path))
    return path


@pytest.fixture
def nix(monkeypatch):
    """Real Nix as the oracle; the test fails (not skips) in CI when Nix is missing."""
    if not have_nix():
        if os.environ.get("CI"):
            pytest.fail("nix-bin is not installed; .ci/run installs it")
        pytest.skip("real Nix not installed (apt-get install nix-bin)")
    for key, value in nix_env().items():
        monkeypatch.setenv(key, value)
    return shutil.which("nix")


@pytest.fixture
def http_dir(tmp_path):
    """Serve a fresh directory on 127.0.0.1; yields (root_dir, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    with serve_directory(root) as base:
        yield root, base


def run_cli(*args, env=None, cwd=None, check=False):
    """Run `python -m pylmserv` as a user would; returns CompletedProcess (text)."""
    import sys

    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "pylmserv", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"pylmserv {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
