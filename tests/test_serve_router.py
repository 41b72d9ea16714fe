"""`pylmserv serve NAME NAME...` / `serve --all`: every locked model behind one endpoint
(llama-server's router mode), what pylmserv owns of it: the models preset written from the
lock, the router's settings, the refusals, the key file, and that nothing is left running.

Against the stand-in llama-server (tests/support/standin_tools.py, which records the preset
and answers the router's GET /models); the real router with the real `openai` client is
tests/test_serve_router_e2e.py (slow). The router support check reads the real llama.cpp
sources of the cached llama-cpp-python sdists.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pylmserv.app.serve import (ROUTER_SINCE, RouterModel, RouterSettings, check_router_settings, models_preset,
                                read_api_key_file, router_support, settings_args)
from pylmserv.core.errors import ConfigError, UsageError
from pylmserv.pins.config import load_config
from tests.conftest import run_cli
from tests.support import llama_source
from tests.support import standin_tools as st
from tests.test_serve import alive, free_port, read_ready, wait_for

EMPTY_GGUF = struct.pack("<4sIQQ", b"GGUF", 3, 0, 0)  # a valid header: no tensors, no keys

TOML = '''
[models.chat-a]
url = "{base}/a.gguf"
[models.chat-a.server]
ctx-size = 512
jinja = true
temp = 0.25

[models.embed-b]
url = "{base}/b.gguf"
role = "embedding"

[models.c]
url = "{base}/c.gguf"
'''


@pytest.fixture
def proj(tmp_path, http_dir, home):
    www, base = http_dir
    for name in "abc":
        (www / f"{name}.gguf").write_bytes(EMPTY_GGUF + name.encode() * 100)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text(TOML.format(base=base))
    run_cli("prefetch", "--via", "python", cwd=proj, check=True, env={"PYLMSERV_HOME": str(home)})
    return proj


@pytest.fixture
def standin(tmp_path):
    return st.llama_server(tmp_path / "bin")


def start(proj, home, standin, tmp_path, *args, env=None):
    port = free_port()
    record = tmp_path / "record.json"
    full_env = dict(os.environ, STANDIN_RECORD=str(record), PYLMSERV_HOME=str(home))
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "pylmserv", "serve", *args, "--server-bin", str(standin),
                             "--port", str(port), "--json"], cwd=proj, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)
    return proc, port, record


def stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def sections(preset: str) -> dict:
    out, name = {}, None
    for line in preset.splitlines():
        if line.startswith("["):
            name = line.strip("[]")
            out[name] = {}
        elif "=" in line and name and not line.startswith(";"):
            k, v = (x.strip() for x in line.split("=", 1))
            out[name][k] = v
    return out


# -- the preset, the settings, the config ---------------------------------------------------

def test_two_names_start_the_router_on_a_preset_of_verified_store_paths(proj, home, standin, tmp_path):
    proc, port, record = start(proj, home, standin, tmp_path, "chat-a", "embed-b")
    try:
        ready = read_ready(proc)
        assert ready["models"] == ["chat-a", "embed-b"] and ready["api"] == f"http://127.0.0.1:{port}/v1"
        rec = json.loads(record.read_text())
        argv = rec["argv"][1:]
        assert "-m" not in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
        assert "--models-max" not in argv  # not asked: llama.cpp's own default
        got = sections(rec["preset"])
        assert set(got) == {"*", "chat-a", "embed-b"}
        for name in ("chat-a", "embed-b"):
            path = Path(got[name]["model"])
            assert path.is_absolute() and path.resolve().is_relative_to(home.resolve())
        assert got["chat-a"] == {"model": got["chat-a"]["model"], "ctx-size": "512", "jinja": "true", "temp": "0.25"}
        assert got["embed-b"]["embeddings"] == "true" and "load-on-startup" not in got["embed-b"]
        # the router lists the models of its cache too: it gets an empty one
        assert rec["llama_cache"] and not os.listdir(rec["llama_cache"]) if os.path.exists(rec["llama_cache"]) else True
        pid = rec["pid"]
    finally:
        out, err = stop(proc)
    assert proc.returncode == 130, err
    assert wait_for(lambda: not alive(pid))
    assert not os.path.exists(rec["llama_cache"])  # the preset's private directory is gone too


def test_all_and_router_settings(proj, home, standin, tmp_path):
    proc, _, record = start(proj, home, standin, tmp_path, "--all", "--max-loaded", "3", "--idle-unload", "60",
                            "--preload", "c", "--pin", "chat-a", "--ngl", "7")
    try:
        ready = read_ready(proc)
        assert ready["models"] == ["c", "chat-a", "embed-b"]  # the lock's, sorted
        rec = json.loads(record.read_text())
        argv = rec["argv"]
        assert argv[argv.index("--models-max") + 1] == "3"
        got = sections(rec["preset"])
        assert got["*"] == {"n-gpu-layers": "7", "sleep-idle-seconds": "60"}
        assert got["c"]["load-on-startup"] == "true" and "sleep-idle-seconds" not in got["c"]
        assert got["chat-a"]["load-on-startup"] == "true" and got["chat-a"]["sleep-idle-seconds"] == "-1"
        assert "load-on-startup" not in got["embed-b"]
    finally:
        stop(proc)


def test_a_preloaded_model_that_fails_is_named_and_nothing_is_left(proj, home, standin, tmp_path):
    proc, _, record = start(proj, home, standin, tmp_path, "chat-a", "c", "--preload", "c",
                            env={"STANDIN_FAIL_MODEL": "c"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and out == ""  # never announced ready
    assert "model c failed to load" in err and "Traceback" not in err
    assert wait_for(lambda: not alive(json.loads(record.read_text())["pid"]))


@pytest.mark.parametrize("settings, message", [
    (RouterSettings(("a", "b", "c"), max_loaded=2, pin=("a",)), "--pin cannot be kept with --max-loaded 2"),
    (RouterSettings(("a", "b", "c"), max_loaded=1, preload=("a", "b")), "2 models to load at start"),
    (RouterSettings(("a", "b"), pin=("x",)), "--pin x: not one of the models"),
    (RouterSettings(("a", "a")), "model named twice"),
    (RouterSettings(("a", "b"), idle_unload=0), "--idle-unload 0"),
    (RouterSettings(("a", "b"), max_loaded=-1), "--max-loaded -1"),
    (RouterSettings(("a", "./x.gguf")), "by their catalog names only"),
])
def test_router_settings_refused(settings, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        check_router_settings(settings)


def test_pin_with_a_limit_that_evicts_nothing_is_allowed():
    check_router_settings(RouterSettings(("a", "b"), max_loaded=2, pin=("a",)))
    check_router_settings(RouterSettings(("a", "b"), max_loaded=0, pin=("a", "b")))


def test_pin_refusal_says_what_the_router_lacks(proj, home, standin, tmp_path):
    proc = run_cli("serve", "--all", "--max-loaded", "1", "--pin", "c", "--server-bin", standin, cwd=proj,
                   env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no setting that exempts one" in proc.stderr


def test_preset_refuses_what_its_ini_cannot_carry(tmp_path):
    with pytest.raises(Exception, match="cannot be written"):
        models_preset([RouterModel("a", Path("/store/x ;y.gguf"))], RouterSettings(("a",)))
    with pytest.raises(Exception, match="cannot be written"):
        models_preset([RouterModel("a", Path("/store/x\ny.gguf"))], RouterSettings(("a",)))


@pytest.mark.parametrize("table, message", [
    ('[models.m.server]\nport = 1', "port is set by pylmserv"),
    ('[models.m.server]\nmodel = "/etc/shadow"', "model is set by pylmserv"),
    ('[models.m.server]\nembeddings = true', "embeddings is set by pylmserv"),
    ('[models.m.server]\n"Bad Key" = 1', "bad option name"),
    ('[models.m.server]\nchat-template = "a ; b"', "cannot be carried"),
    ('[models.m.server]\nchat-template = "a\\nb"', "cannot be carried"),
    ('[models.m.server]\nx = [1]', "must be a string, number or boolean"),
    ('[models.m.server]\nx = nan', "finite"),
    ('role = "rerank"', "unknown role"),
])
def test_config_refuses_serving_settings(tmp_path, table, message):
    path = tmp_path / "pylmserv.toml"
    path.write_text(f'[models.m]\nurl = "https://example.invalid/m.gguf"\n{table}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_one_model_gets_its_settings_as_arguments(proj, home, standin, tmp_path):
    proc, _, record = start(proj, home, standin, tmp_path, "embed-b")
    try:
        read_ready(proc)
        argv = json.loads(record.read_text())["argv"]
        assert "-m" in argv and "--embeddings" in argv and "--models-preset" not in argv
    finally:
        stop(proc)
    assert settings_args("chat", {"ctx-size": 512, "jinja": True, "mmap": False}) == [
        "--ctx-size", "512", "--jinja", "--no-mmap"]


@pytest.mark.parametrize("extra", [["-m", "/tmp/other.gguf"], ["--models-dir", "/tmp"], ["--models-max=9"],
                                   ["--alias", "x"], ["-hf", "org/repo"], ["--host", "0.0.0.0"]])
def test_router_refuses_arguments_that_replace_its_models(proj, home, standin, tmp_path, extra):
    proc = run_cli("serve", "chat-a", "c", "--server-bin", standin, "--", *extra, cwd=proj,
                   env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2 and "refusing server argument" in proc.stderr, proc.stderr


def test_unknown_name_and_all_with_names_are_refused(proj, home, standin):
    proc = run_cli("serve", "chat-a", "nope", "--server-bin", standin, cwd=proj, env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr
    proc = run_cli("serve", "--all", "c", "--server-bin", standin, cwd=proj, env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2 and "--all" in proc.stderr


def test_every_model_is_verified_before_the_router_starts(proj, home, standin, tmp_path, http_dir):
    www, _ = http_dir
    (www / "c.gguf").write_bytes(EMPTY_GGUF + b"tampered" * 10)  # the mirror now lies about c
    record = tmp_path / "record.json"
    proc = run_cli("serve", "chat-a", "c", "--server-bin", standin, cwd=proj,
                   env={"PYLMSERV_HOME": str(home), "STANDIN_RECORD": str(record)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert not record.exists()  # no server was started


# -- a llama.cpp without router mode -------------------------------------------------------

def test_old_llama_server_is_refused_in_one_line_naming_the_version(proj, home, tmp_path):
    old = st.llama_server(tmp_path / "old")
    old.write_text(old.read_text().replace("--models-preset", "--no-such-option"))  # predates router mode
    record = tmp_path / "record.json"
    proc = run_cli("serve", "chat-a", "c", "--server-bin", old, cwd=proj,
                   env={"PYLMSERV_HOME": str(home), "STANDIN_RECORD": str(record)})
    assert proc.returncode == 2 and not record.exists()
    error = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1 and "predates llama-server's router mode" in error[0] and "0.3.17" in error[0]
    assert "0.3.17" in ROUTER_SINCE


def _arg_cpp(version: str, tmp_path: Path) -> Path:
    sdist = llama_source.sdist_path(version)
    if not sdist.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{sdist} missing: scripts/setup-dev.sh downloads it")
        pytest.skip(f"{sdist} not cached")
    tree = tmp_path / version
    member = f"llama_cpp_python-{version}/vendor/llama.cpp/common/arg.cpp"
    with tarfile.open(sdist) as tar:
        data = tar.extractfile(member).read()
    (tree / "common").mkdir(parents=True)
    (tree / "common" / "arg.cpp").write_bytes(data)
    return tree


def test_router_support_is_read_from_the_real_sources(tmp_path):
    """The real llama.cpp of llama-cpp-python 0.3.9 (May 2025) has no router; 0.3.36's has."""
    missing = tmp_path / "no-binary"
    assert router_support(missing, _arg_cpp(llama_source.SDIST_VERSION, tmp_path)) is True
    assert router_support(missing, _arg_cpp("0.3.9", tmp_path)) is False


# -- the API key from a file ---------------------------------------------------------------

def test_api_key_file_reaches_the_router_by_environment_only(proj, home, standin, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-from-a-file\n")
    proc, port, record = start(proj, home, standin, tmp_path, "chat-a", "c", "--api-key-file", str(key_file))
    try:
        read_ready(proc)
        rec = json.loads(record.read_text())
        assert "s3cret-from-a-file" not in " ".join(rec["argv"]) and "s3cret-from-a-file" not in rec["preset"]
        environ = Path(f"/proc/{rec['pid']}/environ").read_bytes().split(b"\0")
        assert b"LLAMA_API_KEY=s3cret-from-a-file" in environ
    finally:
        out, err = stop(proc)
    assert "s3cret" not in out + err


@pytest.mark.parametrize("content, message", [
    ("", "is empty"), ("a,b\n", "unusable"), ("two\nlines\n", "unusable"), ("x" * 5000, "larger than"),
])
def test_api_key_file_refusals(tmp_path, content, message):
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_api_key_file(path)
    with pytest.raises(UsageError, match="cannot read"):
        read_api_key_file(tmp_path / "missing")


def test_api_key_and_key_file_together_are_refused(proj, home, standin, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k\n")
    proc = run_cli("serve", "c", "--api-key", "k", "--api-key-file", key_file, "--server-bin", standin, cwd=proj,
                   env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2 and "not both" in proc.stderr
