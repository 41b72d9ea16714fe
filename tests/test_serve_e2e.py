"""`pylmserv serve` end to end with the real llama-server (slow; CI runs it).

llama.cpp is built once per session from the real source (the llama-cpp-python sdist's
vendored tree, served on 127.0.0.1 through the locked-source path) by the build tests'
helper; the model is the tiny random-weight GGUF. `pylmserv serve` must find that build
(no second build), start llama-server on 127.0.0.1, answer a completion over HTTP, and
leave no process behind after Ctrl-C.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support import llama_source
from tests.test_serve import alive, free_port, read_ready, wait_for

pytestmark = pytest.mark.slow


def pids_running(needle: str):
    """PIDs of running processes whose command line mentions `needle`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if needle in cmdline and alive(int(entry)):
            out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def built():
    return llama_source.built_llama_cpp()


def _source_tree(lock_path: str) -> Path:
    from pylmserv.pins.config import load_lock
    from pylmserv.store.trees import store_path

    entry = load_lock(Path(lock_path)).entry("sources", "llama-cpp")
    return store_path(entry, llama_source.PERSISTENT_HOME)


def test_serve_real_llama_server_completion_and_ctrl_c(built, tmp_path):
    from tests.support.tinymodel import tiny_model

    model = tiny_model(tmp_path, _source_tree(built["lock"]))
    port = free_port()
    env = llama_source.build_env()
    argv = [sys.executable, "-m", "pylmserv", "--config", built["config"], "--lock", built["lock"], "serve", str(model),
            "--backend", "cpu", "--port", str(port), "--json", "--timeout", "120", "--", "--ctx-size", "256", "--threads", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready = read_ready(proc, timeout=300)
        assert ready["url"] == f"http://127.0.0.1:{port}/"
        servers = pids_running(str(model))
        assert servers, "no llama-server process serving the model"

        # OpenAI-compatible API and the native completion endpoint, over loopback.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as resp:
            models = json.loads(resp.read())
        assert models["data"] and models["data"][0]["id"]
        body = json.dumps({"prompt": "Once upon a time", "n_predict": 8, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        assert isinstance(answer["content"], str)
        assert answer["tokens_predicted"] >= 1

        chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
        req = urllib.request.Request(f"{ready['api']}/chat/completions", data=chat,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert json.loads(resp.read())["choices"][0]["message"]["role"] == "assistant"

        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal delivers
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "configuring llama.cpp" not in err  # serve reused the session's build
    assert wait_for(lambda: not any(alive(p) for p in servers), timeout=10), "llama-server left running"
    assert pids_running(str(model)) == []


def test_serve_real_refuses_public_bind(built, tmp_path):
    """Refusal happens before anything starts, with the real build in place too."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    proc = subprocess.run([sys.executable, "-m", "pylmserv", "--config", built["config"], "--lock", built["lock"],
                           "serve", str(model), "--host", "0.0.0.0"], capture_output=True, text=True,
                          env=llama_source.build_env(), timeout=60)
    assert proc.returncode == 2
    assert "refusing to bind 0.0.0.0" in proc.stderr and "--public" in proc.stderr
    assert pids_running(str(model)) == []
