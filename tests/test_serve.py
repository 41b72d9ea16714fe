"""`pylmserv serve` lifecycle against a stand-in llama-server (tests/support/standin_tools.py).

The stand-in is a real process speaking llama-server's /health and /completion shapes on
127.0.0.1; the real llama-server is exercised by tests/test_serve_e2e.py (slow). These
tests check what serve itself owns: refusing a public bind, waiting for /health, Ctrl-C
and SIGTERM forwarding, SIGKILL escalation, and that no process is left behind.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pylmserv.core.errors import UsageError
from pylmserv.app.serve import ServeOptions, ServerProcess, check_bind, is_loopback, server_command, urls_for
from tests.conftest import run_cli
from tests.support import standin_tools as st


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone: it runs nothing)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(pred, timeout=20.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return False


@pytest.fixture
def standin(tmp_path):
    return st.llama_server(tmp_path / "bin")


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def start_serve(standin, model, tmp_path, *args, env=None):
    """`python -m pylmserv serve ... --json` as a user would run it; returns (proc, port, record)."""
    port = free_port()
    record = tmp_path / "record.json"
    full_env = dict(os.environ, STANDIN_RECORD=str(record), PYLMSERV_HOME=str(tmp_path / "home"))
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "pylmserv", "serve", str(model), "--server-bin", str(standin),
                             "--port", str(port), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    return proc, port, record


def read_ready(proc, timeout=30):
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError("serve never printed its ready line:\n" + proc.communicate()[1])
    line = proc.stdout.readline()
    if not line:
        raise AssertionError("serve exited before ready:\n" + proc.communicate()[1])
    return json.loads(line)


# -- pure pieces ------------------------------------------------------------------------

@pytest.mark.parametrize("host,expected", [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("192.168.1.10", False), ("example.org", False)])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_check_bind_refuses_public_without_flag():
    with pytest.raises(UsageError) as exc:
        check_bind("0.0.0.0", public=False, api_key=None)
    assert "refusing to bind 0.0.0.0" in exc.value.message
    assert "--public" in exc.value.hint and "--api-key" in exc.value.hint
    check_bind("0.0.0.0", public=True, api_key="k")  # allowed on purpose
    check_bind("127.0.0.1", public=False, api_key=None)


def test_urls_name_loopback_for_wildcard_binds():
    assert urls_for("0.0.0.0", 8080).base == "http://127.0.0.1:8080"
    assert urls_for("::1", 9000).api == "http://[::1]:9000/v1"


def test_server_command_passes_options_through(tmp_path):
    opts = ServeOptions(model="m", host="127.0.0.1", port=8123, ngl=99, api_key="sekret",
                        extra_args=("--ctx-size", "512"))
    argv = server_command(Path("/x/llama-server"), Path("/m/tiny.gguf"), opts)
    assert argv == ["/x/llama-server", "-m", "/m/tiny.gguf", "--host", "127.0.0.1", "--port", "8123",
                    "-ngl", "99", "--ctx-size", "512"]  # the key goes by environment, never into `ps`
    lf = server_command(Path("/x/llamafile"), Path("/m/tiny.gguf"), ServeOptions(model="m", engine="llamafile"))
    assert lf[:3] == ["/x/llamafile", "--server", "--nobrowser"]


# -- the CLI, refusing bad input before starting anything ----------------------------------

def test_cli_refuses_0_0_0_0_without_public(standin, model, tmp_path, home):
    record = tmp_path / "record.json"
    proc = run_cli("serve", model, "--server-bin", standin, "--host", "0.0.0.0", env={"STANDIN_RECORD": str(record)})
    assert proc.returncode == 2
    assert "error: refusing to bind 0.0.0.0" in proc.stderr
    assert "--public" in proc.stderr and "--api-key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not record.exists()  # the server was never started


def test_cli_missing_model_file(standin, tmp_path, home):
    proc = run_cli("serve", tmp_path / "nope.gguf", "--server-bin", standin)
    assert proc.returncode == 2 and "model file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unknown_catalog_name(standin, home):
    proc = run_cli("serve", "no-such-model", "--server-bin", standin)
    assert proc.returncode == 2
    assert "unknown model 'no-such-model'" in proc.stderr and "stories15m" in proc.stderr


def test_cli_port_in_use(standin, model, home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("serve", model, "--server-bin", standin, "--port", port)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port N" in proc.stderr


def test_cli_server_bin_not_executable(model, tmp_path, home):
    bad = tmp_path / "llama-server"
    bad.write_text("not a program")
    proc = run_cli("serve", model, "--server-bin", bad)
    assert proc.returncode == 2 and "not executable" in proc.stderr


# -- lifecycle -----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_standin_ready_then_signal_stops_everything(standin, model, tmp_path, sig):
    proc, port, record = start_serve(standin, model, tmp_path, "--ngl", "0", "--", "--ctx-size", "256",
                                     env={"STANDIN_LOAD_SECONDS": "1.0", "STANDIN_SPAWN_CHILD": "1"})
    try:
        ready = read_ready(proc)
        assert ready["url"] == f"http://127.0.0.1:{port}/" and ready["api"] == f"http://127.0.0.1:{port}/v1"
        # Ready means /health already answers 200, after the 503s of loading.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200
        state = json.loads(record.read_text())
        assert state["polls_503"] >= 1
        assert state["argv"][1:] == ["-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                     "-ngl", "0", "--ctx-size", "256"]
        server_pid, child_pid = state["pid"], state["child"]
        assert alive(server_pid) and alive(child_pid)
        # A completion over HTTP reaches the server.
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=b'{"prompt": "hi"}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["content"]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "pylmserv: server stopped" in err and "Traceback" not in err
    assert wait_for(lambda: not alive(server_pid) and not alive(child_pid), timeout=5), "a process was left behind"


def test_standin_server_exits_before_ready(standin, model, tmp_path):
    proc, port, record = start_serve(standin, model, tmp_path, env={"STANDIN_EXIT_EARLY": "1"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "error: the server exited with status 1 before it was ready" in err
    assert "error loading model" in err  # the tail of the server's log, shown to the user
    assert "llama-server-" in err and "Traceback" not in err
    assert out == ""


def test_standin_health_timeout(standin, model, tmp_path):
    proc, port, record = start_serve(standin, model, tmp_path, "--timeout", "1",
                                     env={"STANDIN_LOAD_SECONDS": "60", "STANDIN_SPAWN_CHILD": "1"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "did not become ready within 1s" in err and "HTTP 503" in err and "--timeout" in err
    state = json.loads(record.read_text())
    assert wait_for(lambda: not alive(state["pid"]) and not alive(state["child"]), timeout=5)


def test_standin_sigint_while_loading(standin, model, tmp_path):
    proc, port, record = start_serve(standin, model, tmp_path, env={"STANDIN_LOAD_SECONDS": "60"})
    assert wait_for(lambda: record.exists() and json.loads(record.read_text())["polls_503"] >= 1)
    pid = json.loads(record.read_text())["pid"]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and out == ""  # never announced ready
    assert wait_for(lambda: not alive(pid), timeout=5)


def test_standin_pylmserv_killed_takes_the_server_with_it(standin, model, tmp_path):
    """Even SIGKILL of pylmserv (no chance to clean up) stops the server: PR_SET_PDEATHSIG."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    proc, port, record = start_serve(standin, model, tmp_path)
    read_ready(proc)
    pid = json.loads(record.read_text())["pid"]
    proc.kill()
    proc.wait(timeout=10)
    assert wait_for(lambda: not alive(pid), timeout=10), "llama-server outlived a SIGKILLed pylmserv"


def test_standin_stubborn_server_is_killed(standin, tmp_path):
    """A server that ignores SIGTERM is SIGKILLed after the grace period, with its group."""
    record = tmp_path / "r.json"
    port = free_port()
    env = dict(os.environ, STANDIN_RECORD=str(record), STANDIN_IGNORE_TERM="1", STANDIN_SPAWN_CHILD="1")
    server = ServerProcess([str(standin), "--host", "127.0.0.1", "--port", str(port)], log_file=tmp_path / "log",
                           env=env)
    assert wait_for(lambda: record.exists())
    child = json.loads(record.read_text())["child"]
    t0 = time.monotonic()
    server.stop(signal.SIGTERM, grace=1.0)
    assert time.monotonic() - t0 >= 0.9  # it did wait for a clean exit first
    assert not server.group_alive()
    assert wait_for(lambda: not alive(server.pid) and not alive(child), timeout=5)


# -- llamafile engine: APE files and binfmt_misc --------------------------------------------

def test_standin_llamafile_runs_through_sh_when_binfmt_cannot(tmp_path, model):
    """With no APE rule in binfmt_misc (a fabricated, empty one), an APE llamafile cannot be
    exec'd directly (ENOEXEC): serve starts it through /bin/sh and it serves."""
    binfmt = tmp_path / "binfmt"
    binfmt.mkdir()
    (binfmt / "status").write_text("enabled\n")
    (binfmt / "register").write_text("")
    llamafile = st.ape_llamafile(tmp_path / "lf")
    with pytest.raises(OSError):  # what a direct exec does here: ENOEXEC
        subprocess.run([str(llamafile)], timeout=10)
    proc, port, record = start_serve(llamafile, model, tmp_path, "--engine", "llamafile",
                                     env={"PYLMSERV_BINFMT_DIR": str(binfmt)})
    try:
        read_ready(proc)
        state = json.loads(record.read_text())
        got = (tmp_path / "record.json.llamafile-args").read_text().split("\n")
        assert got[:4] == ["--server", "--nobrowser", "-m", str(model)]  # llamafile's own server mode
        assert state["argv"][1:3] == ["-m", str(model)]
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert wait_for(lambda: not alive(state["pid"]), timeout=5)


def test_needs_shell_follows_binfmt(tmp_path):
    from pylmserv.app.serve import _needs_shell

    llamafile = st.ape_llamafile(tmp_path / "lf")
    ape = tmp_path / "ape"
    ape.mkdir()
    (ape / "status").write_text("enabled\n")
    (ape / "APE").write_text("enabled\ninterpreter /usr/bin/ape\nflags: \noffset 0\nmagic 4d5a71467044\n")
    wine = tmp_path / "wine"
    wine.mkdir()
    (wine / "status").write_text("enabled\n")
    (wine / "wine").write_text("enabled\ninterpreter /usr/bin/wine\nflags: \noffset 0\nmagic 4d5a\n")
    assert _needs_shell(llamafile, ape) is False
    assert _needs_shell(llamafile, wine) is True
    assert _needs_shell(tmp_path / "lf" / "inner" / "llama-server", wine) is False  # not an APE


def test_existing_build_targets_picks_a_current_build_with_llama_server(tmp_path, home):
    """serve reuses any up-to-date build of the locked source that has llama-server."""
    from pylmserv.store import records as stamps
    from pylmserv.builders.llama_cpp import MAPPING_VERSION
    from pylmserv.pins.config import load_project
    from pylmserv.app.serve import existing_build_targets

    repo = Path(__file__).resolve().parent.parent
    source = load_project(repo / "pylmserv.toml").lock.sources["llama-cpp"].hash.sri
    out = tmp_path / "out"
    out.mkdir()
    for name in ("llama-cli", "llama-server", "llama-bench"):
        (out / name).write_bytes(b"\x7fELF")

    def stamp(key, mapping, src, targets):
        inputs = {"engine": "llama.cpp", "mapping": mapping, "source": src, "backend": "cpu", "targets": targets}
        d = home / "builds" / f"llama.cpp-cpu-{key}"
        d.mkdir(parents=True)
        stamps.write_stamp(d / stamps.STAMP_NAME, stamps.make_stamp(inputs, {t: out / t for t in targets}))

    cfg = repo / "pylmserv.toml"
    assert existing_build_targets("cpu", cfg) is None
    stamp("a", MAPPING_VERSION, "sha256-" + "A" * 43 + "=", ["llama-cli", "llama-server"])  # other source
    stamp("b", MAPPING_VERSION - 1, source, ["llama-server", "llama-bench"])  # older mapping
    stamp("c", MAPPING_VERSION, source, ["llama-cli"])  # no server
    assert existing_build_targets("cpu", cfg) is None
    stamp("d", MAPPING_VERSION, source, ["llama-cli", "llama-server"])
    assert existing_build_targets("cpu", cfg) == ("llama-cli", "llama-server")
    assert existing_build_targets("cuda", cfg) is None
    (out / "llama-cli").unlink()  # an output gone: not up to date any more
    assert existing_build_targets("cpu", cfg) is None


# -- options from the CLI: where they end up -----------------------------------------------------

def _served_key(standin, model, tmp_path, *args, env=None):
    """Run serve until ready, stop it; return (argv, LLAMA_API_KEY or None) of the (stand-in) server."""
    proc, port, record = start_serve(standin, model, tmp_path, *args, env=env)
    try:
        read_ready(proc)
        state = json.loads(record.read_text())
        with open(f"/proc/{state['pid']}/environ", "rb") as f:
            child_env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    key = child_env.get(b"LLAMA_API_KEY")
    return state["argv"], key.decode() if key is not None else None


def test_api_key_flag_and_env_reach_the_server(standin, model, tmp_path):
    """--api-key and PYLMSERV_API_KEY both reach llama-server (by its environment, not argv)."""
    argv, key = _served_key(standin, model, tmp_path, "--api-key", "k-flag")
    assert key == "k-flag" and "--api-key" not in argv
    argv, key = _served_key(standin, model, tmp_path, env={"PYLMSERV_API_KEY": "k-env"})
    assert key == "k-env" and "--api-key" not in argv
    argv, key = _served_key(standin, model, tmp_path, env={"PYLMSERV_API_KEY": ""})
    assert key is None


def test_server_bin_from_the_environment(standin, model, tmp_path, home):
    """PYLMSERV_SERVER_BIN stands for --server-bin (nothing is built)."""
    port = free_port()
    record = tmp_path / "record.json"
    env = dict(os.environ, STANDIN_RECORD=str(record), PYLMSERV_HOME=str(home), PYLMSERV_SERVER_BIN=str(standin))
    proc = subprocess.Popen([sys.executable, "-m", "pylmserv", "serve", str(model), "--port", str(port), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        read_ready(proc)
        assert json.loads(record.read_text())["argv"][0] == str(standin)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (home / "builds").exists()


def test_log_flag_sends_the_server_output_to_that_file(standin, model, tmp_path):
    log = tmp_path / "logs" / "server.log"
    proc, _, _ = start_serve(standin, model, tmp_path, "--log", str(log), env={"STANDIN_EXIT_EARLY": "3"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "error loading model" in log.read_text()
    assert "error loading model" in err  # the tail of that log is quoted in the error


def test_public_without_api_key_warns_and_with_one_does_not(standin, model, tmp_path):
    # The stand-in exits before it listens: nothing is ever bound on 0.0.0.0.
    early = {"STANDIN_EXIT_EARLY": "1"}
    proc, _, _ = start_serve(standin, model, tmp_path, "--host", "0.0.0.0", "--public", env=early)
    _, err = proc.communicate(timeout=60)
    assert "without --api-key: anyone on the network can use it" in err
    proc, _, _ = start_serve(standin, model, tmp_path, "--host", "0.0.0.0", "--public", "--api-key", "k", env=early)
    _, err = proc.communicate(timeout=60)
    assert "anyone on the network" not in err and "error" in err


def test_offline_serves_nothing_it_would_have_to_download(standin, tmp_path, home, http_dir):
    www, base = http_dir
    (www / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text(f'[models.tiny]\nurl = "{base}/tiny.gguf"\n')
    run_cli("prefetch", "--via", "python", cwd=proj, check=True)
    (www / "tiny.gguf").unlink()  # anything fetched now would have to come from the network: it is gone
    proc = run_cli("serve", "tiny", "--offline", "--server-bin", standin, cwd=proj, env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2, proc.stderr
    assert "--offline" in proc.stderr and "Traceback" not in proc.stderr
    online = run_cli("serve", "tiny", "--server-bin", standin, cwd=proj, env={"PYLMSERV_HOME": str(home)})
    assert online.returncode == 3 and "404" in online.stderr  # without --offline it tried the network


# -- the bind address and the API key cannot be slipped past pylmserv (issue 10) ------------

@pytest.mark.parametrize("extra", [
    ["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--ctx-size", "256", "--host", "::"], ["--port", "80"],
    ["--port=22"], ["--api-key", "visible-in-ps"], ["--api-key=visible"], ["--api-key-file", "/etc/passwd"],
])
def test_cli_refuses_host_port_and_key_after_double_dash(standin, model, tmp_path, home, extra):
    record = tmp_path / "record.json"
    proc = run_cli("serve", model, "--server-bin", standin, "--", *extra, env={"STANDIN_RECORD": str(record)})
    assert proc.returncode == 2, proc.stderr
    assert "refusing server argument" in proc.stderr and "Traceback" not in proc.stderr
    assert not record.exists()  # the server was never started


@pytest.mark.parametrize("key", ["a,b", "two words", "#comment", "line\nbreak", ""])
def test_cli_refuses_keys_the_server_would_split(standin, model, tmp_path, home, key):
    record = tmp_path / "record.json"
    proc = run_cli("serve", model, "--server-bin", standin, "--api-key", key, env={"STANDIN_RECORD": str(record)})
    assert proc.returncode == 2 and "unusable --api-key" in proc.stderr, proc.stderr
    assert not record.exists()


def test_api_key_never_on_the_child_command_line(standin, model, tmp_path):
    """llama-server gets the key through LLAMA_API_KEY: not in its argv (what `ps` shows),
    and clients without it are refused while clients with it are served."""
    key = "k3y-only-in-env_Secret"
    proc, port, record = start_serve(standin, model, tmp_path, "--api-key", key,
                                     env={"LLAMA_ARG_HOST": "0.0.0.0"})  # a stray env cannot rebind either
    try:
        read_ready(proc)
        state = json.loads(record.read_text())
        assert all(key not in a for a in state["argv"]), state["argv"]
        with open(f"/proc/{state['pid']}/cmdline", "rb") as f:
            assert key.encode() not in f.read()
        with open(f"/proc/{state['pid']}/environ", "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        assert env[b"LLAMA_API_KEY"] == key.encode() and b"LLAMA_ARG_HOST" not in env
        url = f"http://127.0.0.1:{port}/completion"
        req = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=5)
        assert exc.value.code == 401
        req.add_header("Authorization", "Bearer " + key)
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_llamafile_gets_the_key_in_a_private_file_removed_afterwards(tmp_path):
    """llamafile 0.8.4 reads no LLAMA_API_KEY (its server.cpp: --api-key or --api-key-file):
    the key goes into a 0600 file in a 0700 directory, named on the command line instead."""
    from pylmserv.app.serve import api_key_file, server_env

    opts = ServeOptions(model="m", engine="llamafile", api_key="lf-secret")
    with api_key_file(opts) as path:
        argv = server_command(Path("/x/llamafile"), Path("/m/tiny.gguf"), opts, path)
        assert "lf-secret" not in " ".join(argv) and argv[argv.index("--api-key-file") + 1] == str(path)
        assert path.read_text() == "lf-secret\n"
        assert (path.stat().st_mode & 0o777) == 0o600 and (path.parent.stat().st_mode & 0o777) == 0o700
    assert not path.exists() and not path.parent.exists()
    assert not {"LLAMA_API_KEY", "PYLMSERV_API_KEY"} & set(server_env(opts, {"LLAMA_API_KEY": "stray",
                                                                              "PYLMSERV_API_KEY": "lf-secret"}))


def test_backend_from_the_environment_is_read_and_checked(tmp_path, home):
    """PYLMSERV_BACKEND stands for --backend: a bad value is refused like a bad flag."""
    proc = run_cli("serve", "tiny", env={"PYLMSERV_BACKEND": "nope"})
    assert proc.returncode == 2 and "'nope' is not one of" in proc.stderr, proc.stderr
