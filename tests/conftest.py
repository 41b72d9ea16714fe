"""Shared fixtures: an isolated PYLMSERV_HOME, real Nix configured for offline root use,
and a loopback HTTP server for any directory."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import gitrepos
from tests.support.faultserver import fault_server
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
def server():
    """A loopback HTTP server whose faults a test injects (tests/support/faultserver.py)."""
    with fault_server() as s:
        yield s


@pytest.fixture
def gitenv(monkeypatch):
    """git with a fixed identity and dates and no user or system config (gitrepos.GIT_ENV)."""
    for k, v in gitrepos.GIT_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def http_dir(tmp_path):
    """Serve a fresh directory on 127.0.0.1; yields (root_dir, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    with serve_directory(root) as base:
        yield root, base


@pytest.fixture
def project(tmp_path, http_dir):
    """A project dir whose pylmserv.toml names one model `m` served on loopback:
    (project dir, served dir, base URL)."""
    www, base = http_dir
    (www / "m.gguf").write_bytes(b"GGUF" + bytes(100))
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text(f'[models.m]\nurl = "{base}/m.gguf"\n')
    return proj, www, base


def run_cli(*args, env=None, cwd=None, check=False):
    """Run `python -m pylmserv` as a user would; returns CompletedProcess (text)."""
    import sys

    full_env = dict(os.environ)
    # This checkout's pylmserv, whatever an editable install elsewhere points at.
    repo = str(Path(__file__).resolve().parent.parent)
    full_env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in [full_env.get("PYTHONPATH")] if p])
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "pylmserv", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"pylmserv {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def pytest_collection_modifyitems(config, items):
    """One rule for the `nix` marker: a test is marked `nix` exactly when it needs real Nix,
    that is, uses the `nix` fixture or a fixture that sets Nix up itself (module-scoped ones
    call nix_env()/have_nix(): a function-scoped fixture cannot serve them). `-m "not nix"`
    then deselects exactly the tests that need real Nix."""
    wrong = []
    for item in items:
        marked = item.get_closest_marker("nix") is not None
        uses = _uses_nix(item)
        if marked != uses:
            wrong.append(f"{item.nodeid}: " + ("marked nix but does not use the nix fixture" if marked
                                               else "uses the nix fixture but is not marked nix"))
    if wrong:
        raise pytest.UsageError("the nix marker is out of step with the nix fixture:\n  " + "\n  ".join(wrong))


def _uses_nix(item) -> bool:
    if "nix" in getattr(item, "fixturenames", ()):
        return True
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        for d in defs:
            names = set(getattr(getattr(d.func, "__code__", None), "co_names", ()))
            if names & {"nix_env", "have_nix"}:
                return True
    return False


@pytest.fixture
def deep_tmp_path(tmp_path):
    """tmp_path for a test that makes trees ~1,000 directories deep: removed after the test
    with pylmserv's own non-recursive deleter, since pytest's later cleanup of old temp
    directories (shutil.rmtree, recursive) hits RecursionError on them."""
    from pylmserv.core.fsutil import remove_no_follow

    yield tmp_path
    remove_no_follow(tmp_path)
