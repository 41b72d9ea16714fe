"""`pylmserv serve NAME... --generate systemd`: the unit it prints.

Checked by the real `systemd-analyze verify` (Debian's systemd 252; as a system and as a
user unit), and by running the unit's own ExecStart the way its sandbox would: the store
mounted read-only with only its logs writable (a private mount namespace, `unshare -m`, as
root), the key read from a credentials directory standing in for %d. The stand-in
llama-server (tests/support/standin_tools.py) answers; the real router is covered by
tests/test_serve_router_e2e.py.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.app.unit import quote_arg
from tests.conftest import run_cli
from tests.test_serve import free_port
from tests.test_serve_router import proj, standin  # noqa: F401 (fixtures)

KEY = "unit-key-never-in-the-unit-7f3a"


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; scripts/setup-dev.sh installs it")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "secrets" / "api-key"
    path.parent.mkdir()
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def fetched(proj, home):
    run_cli("fetch", "chat-a", "c", cwd=proj, check=True, env={"PYLMSERV_HOME": str(home)})
    return proj


def generate(proj, home, standin, *args):
    args = list(map(str, args))
    tail = args[args.index("--"):] if "--" in args else []
    head = args[:len(args) - len(tail)]
    return run_cli("serve", *head, "--generate", "systemd", "--server-bin", standin, *tail, cwd=proj,
                   env={"PYLMSERV_HOME": str(home)})


def settings(unit: str) -> dict:
    out = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def verify(unit_text: str, tmp_path: Path, user: bool) -> subprocess.CompletedProcess:
    tool = need_tool("systemd-analyze")
    path = tmp_path / ("pylmserv-user.service" if user else "pylmserv.service")
    path.write_text(unit_text)
    env = dict(os.environ)
    argv = [tool]
    if user:
        runtime = tmp_path / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        argv.append("--user")
    return subprocess.run(argv + ["verify", "--man=no", str(path)], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("scope", ["--system", "--user"])
def test_unit_is_hardened_loopback_keyless_and_systemd_accepts_it(fetched, proj, home, standin, key_file, tmp_path, scope):
    proc = generate(proj, home, standin, "chat-a", "c", "--api-key-file", key_file, "--max-loaded", "2",
                    "--idle-unload", "300", "--preload", "c", scope, "--backend", "cpu", "--", "--ctx-size", "256")
    assert proc.returncode == 0, proc.stderr
    unit = proc.stdout
    assert KEY not in unit and KEY not in proc.stderr
    s = settings(unit)
    assert s["LoadCredential"] == [f"pylmserv-api-key:{key_file.resolve()}"]
    exec_start = s["ExecStart"][0]
    argv = shlex.split(exec_start)
    assert argv[0] == sys.executable and argv[1:3] == ["-m", "pylmserv"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--offline" in argv
    assert argv[argv.index("--api-key-file") + 1] == "%d/pylmserv-api-key"
    assert argv[argv.index("--server-bin") + 1] == str(standin.resolve())
    assert argv[argv.index("--config") + 1] == str((proj / "pylmserv.toml").resolve())
    assert argv[argv.index("--max-loaded") + 1] == "2" and argv[argv.index("--preload") + 1] == "c"
    assert argv[-3:] == ["--", "--ctx-size", "256"]
    assert s["Environment"][0] == f'"PYLMSERV_HOME={home.resolve()}"'
    assert "--backend" not in argv  # the binary is resolved: the backend it was built for is in it
    for want in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only", "PrivateTmp=yes",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "IPAddressAllow=localhost", "IPAddressDeny=any",
                 f"ReadWritePaths={home.resolve() / 'logs'}", "PrivateDevices=yes"):
        assert want in unit.splitlines(), want
    assert s["ReadWritePaths"] == [str(home.resolve() / "logs")]  # nothing else of the store is writable
    assert s["WantedBy"] == (["multi-user.target"] if scope == "--system" else ["default.target"])
    checked = verify(unit, tmp_path, user=scope == "--user")
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout + checked.stderr


def test_systemd_analyze_really_rejects_a_broken_unit(fetched, proj, home, standin, tmp_path):
    """The verification above can fail: the same unit with a misspelt setting or a missing
    binary is reported."""
    unit = generate(proj, home, standin, "chat-a", "c").stdout
    checked = verify(unit.replace("ProtectSystem=strict", "ProtectSystem=stricter"), tmp_path, user=False)
    assert "protect system value" in checked.stdout + checked.stderr  # a warning, and still exit status 0
    checked = verify(unit.replace(sys.executable, "/nonexistent/python3"), tmp_path, user=False)
    assert checked.returncode != 0


def test_unknown_backend_keeps_the_devices(fetched, proj, home, standin):
    """--server-bin of unknown backend (auto): the GPU's device nodes may be needed, no PrivateDevices."""
    unit = generate(proj, home, standin, "chat-a", "c").stdout
    assert "ProtectSystem=strict" in unit and "PrivateDevices" not in unit


def test_unit_refusals(fetched, proj, home, standin, key_file):
    proc = generate(proj, home, standin, "chat-a", "--api-key", KEY)
    assert proc.returncode == 2 and "never as text" in proc.stderr and KEY not in proc.stderr
    proc = generate(proj, home, standin, "chat-a", "--host", "0.0.0.0", "--public")
    assert proc.returncode == 2 and "loopback only" in proc.stderr
    proc = generate(proj, home, standin, "chat-a", "c", "--max-loaded", "1", "--pin", "c")
    assert proc.returncode == 2 and "--pin" in proc.stderr


def test_unit_needs_the_models_in_the_store_and_a_build(proj, tmp_path):
    """A unit never downloads or builds: generating one in an empty store says what to run first."""
    empty = tmp_path / "empty-home"
    proc = run_cli("serve", "chat-a", "c", "--generate", "systemd", cwd=proj, env={"PYLMSERV_HOME": str(empty)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "a unit never downloads" in proc.stderr and "pylmserv fetch chat-a c" in proc.stderr


def test_quote_arg_escapes_specifiers_and_variables():
    assert quote_arg("/a b/%h$HOME") == '"/a b/%%h$$HOME"'
    assert quote_arg("plain") == "plain"
    with pytest.raises(Exception, match="control character"):
        quote_arg("a\nb")


def need_root():
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test needs root (a private mount namespace)")
        pytest.skip("needs root for unshare -m")
    need_tool("unshare")


def sandboxed_exec_start(unit: str, home: Path, tmp_path: Path, key_file=None, env=None) -> subprocess.Popen:
    """Run the unit's ExecStart (plus --json) as its sandbox would: in a private mount
    namespace where the store is read-only and only its logs are writable; %d is a
    credentials directory holding the key. Refuses to start if the store stayed writable."""
    exec_start = settings(unit)["ExecStart"][0]
    creds = tmp_path / "credentials"  # what systemd's %d would be
    creds.mkdir()
    if key_file is not None:
        shutil.copy(key_file, creds / "pylmserv-api-key")
    argv = [a.replace("%d", str(creds)) for a in shlex.split(exec_start)]
    argv.insert(argv.index("--"), "--json") if "--" in argv else argv.append("--json")
    rw = tmp_path / "logs-rw"
    rw.mkdir()
    h, logs = home.resolve(), home.resolve() / "logs"
    script = (f"set -e; mount --bind {logs} {rw}; mount --bind {h} {h}; mount -o remount,bind,ro {h}; "
              f"mount --bind {rw} {logs}; "
              f"if touch {h}/probe 2>/dev/null; then echo STORE-WRITABLE >&2; exit 9; fi; "
              f"touch {logs}/probe && rm {logs}/probe; "
              f"exec {' '.join(shlex.quote(a) for a in argv)}")
    full_env = dict(os.environ, PYLMSERV_HOME=str(h))
    full_env.update(env or {})
    return subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def test_exec_start_runs_with_the_store_read_only_and_only_logs_writable(fetched, proj, home, standin, key_file, tmp_path):
    """The unit's own ExecStart, in a mount namespace shaped like its sandbox: serve fetches
    (verifies), writes the router's preset to its private /tmp, logs, serves, stops on SIGINT."""
    need_root()
    port = free_port()
    unit = generate(proj, home, standin, "chat-a", "c", "--api-key-file", key_file, "--port", str(port)).stdout
    record = tmp_path / "record.json"
    proc = sandboxed_exec_start(unit, home, tmp_path, key_file, env={"STANDIN_RECORD": str(record)})
    try:
        from tests.test_serve import read_ready
        ready = read_ready(proc, timeout=60)
        assert ready["models"] == ["chat-a", "c"]
        rec = json.loads(record.read_text())
        assert KEY not in " ".join(rec["argv"])
        assert Path(f"/proc/{rec['pid']}/environ").read_bytes().count(f"LLAMA_API_KEY={KEY}".encode()) == 1
    finally:
        proc.send_signal(2)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "STORE-WRITABLE" not in out + err
    assert (home / "logs" / f"llama-server-{port}.log").exists()  # the one place it wrote
