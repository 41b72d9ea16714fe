"""An export imported with no network serves the model (slow: the real llama-server).

Store A fetches the tiny model from a loopback origin and exports it; the origin goes away;
the test session's store (which holds the session's llama.cpp build) imports the bundle
inside `unshare -n` (no network at all), and `pylmserv serve NAME --offline` answers a
completion with it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support import llama_source
from tests.support.httpserver import serve_directory
from tests.support.tinymodel import tiny_model
from tests.test_serve import free_port, read_ready
from tests.test_serve_e2e import _source_tree

pytestmark = pytest.mark.slow

NAME = "share-imported-tiny"


def test_an_export_imported_with_no_network_serves_the_model(tmp_path):
    if subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("unshare -n is needed (root, util-linux)")
        pytest.skip("unshare -n not permitted here")
    built = llama_source.built_llama_cpp()
    www = tmp_path / "www"
    www.mkdir()
    model = tiny_model(www, _source_tree(built["lock"]))
    proj = tmp_path / "proj"
    proj.mkdir()
    config, lock = proj / "pylmserv.toml", proj / "pylmserv.lock"
    shutil.copy(built["lock"], lock)
    bundle = tmp_path / "tiny.oci.tar"
    env_a = {"PYLMSERV_HOME": str(tmp_path / "A")}
    with serve_directory(www) as base:
        config.write_text(Path(built["config"]).read_text() + f'\n[models.{NAME}]\nurl = "{base}/{model.name}"\n')
        run_cli("--config", config, "--lock", lock, "prefetch", NAME, env=env_a, check=True)
        run_cli("--config", config, "--lock", lock, "fetch", NAME, env=env_a, check=True)
        run_cli("--config", config, "--lock", lock, "export", NAME, "-o", bundle, env=env_a, check=True)

    env = llama_source.build_env()
    imported = subprocess.run(["unshare", "-n", sys.executable, "-m", "pylmserv", "import", str(bundle), "--json"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)[0]["name"] == NAME

    port = free_port()
    argv = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock), "serve", NAME,
            "--offline", "--backend", "cpu", "--port", str(port), "--json", "--timeout", "120", "--",
            "--ctx-size", "256", "--threads", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        read_ready(proc, timeout=300)
        body = json.dumps({"prompt": "Once upon a time", "n_predict": 4, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert json.loads(resp.read())["tokens_predicted"] >= 1
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "configuring llama.cpp" not in err
