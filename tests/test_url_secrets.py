"""A password in a URL never reaches pylmserv.toml, pylmserv.lock, logs, --json or an error
message: every writer of URLs refuses userinfo with one line (the URL redacted) and a hint
to the ways that are never written down. Tried as an attacker would: userinfo on the
command line, in the config, in an old lock, in HF_ENDPOINT, in a redirect's Location, in
an error path; every written file and every output is searched for the secret."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pylmserv.core.errors import ConfigError
from pylmserv.transfer.http import refuse_credentials
from tests.conftest import run_cli
from tests.support.faultserver import fault_server

SECRET = "hunter2-s3cret"
GGUF = b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + bytes(4000)  # a valid empty GGUF


def no_secret_anywhere(*procs, roots=(), besides=()) -> None:
    """Not in any output, nor in any file under `roots` but those the test wrote (`besides`)."""
    for proc in procs:
        assert SECRET not in proc.stdout and SECRET not in proc.stderr, (proc.stdout, proc.stderr)
    for root in roots:
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink() and path not in besides:
                    assert SECRET.encode() not in path.read_bytes(), path


def refused(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), proc.stderr
    assert "carries credentials" in lines[0] and ".netrc" in lines[1] and "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("url,ok", [
    ("https://host/m.gguf", True),
    ("https://user:pw@host/m.gguf", False),
    ("https://ghp_token@host/m.gguf", False),  # a token as the user name is a secret too
    ("http://:pw@host/m.gguf", False),
    ("file://user@localhost/tmp/m.gguf", False),
    ("ssh://git@host/repo.git", True),  # an ssh user name is no secret
    ("ssh://git:pw@host/repo.git", False),
    ("https://host/m.gguf?x=a@b", True),  # an @ in the query is no userinfo
])
def test_the_rule(url, ok):
    if ok:
        assert refuse_credentials(url, "t") == url
    else:
        with pytest.raises(ConfigError) as exc:
            refuse_credentials(url, "t")
        assert "pw" not in exc.value.message and "ghp_token" not in exc.value.message


def test_add_refuses_and_writes_nothing(tmp_path, home):
    proc = run_cli("add", f"http://user:{SECRET}@127.0.0.1:9/m.gguf", "--json", cwd=tmp_path)
    line = refused(proc)
    assert "http://127.0.0.1:9/m.gguf" in line and proc.stdout == ""
    assert not (tmp_path / "pylmserv.toml").exists() and not (tmp_path / "pylmserv.lock").exists()
    no_secret_anywhere(proc, roots=[tmp_path])


def test_fetch_url_with_credentials_is_refused(tmp_path, home):
    proc = run_cli("fetch", f"https://user:{SECRET}@127.0.0.1:9/m.gguf", "--trust-on-first-use", "--json",
                   cwd=tmp_path)
    refused(proc)
    no_secret_anywhere(proc, roots=[tmp_path])


@pytest.mark.parametrize("table", [
    f'[models.m]\nurl = "http://u:{SECRET}@127.0.0.1:9/m.gguf"\n',
    f'[sources.s]\ntype = "url"\nurl = "https://u:{SECRET}@127.0.0.1:9/s.tar.gz"\nunpack = true\n',
    f'[sources.g]\ntype = "git"\nurl = "https://{SECRET}@127.0.0.1:9/r.git"\nref = "main"\n',
])
@pytest.mark.parametrize("command", [("prefetch",), ("update",), ("list",), ("fetch", "m")])
def test_config_with_credentials_stops_every_command(tmp_path, home, table, command):
    (tmp_path / "pylmserv.toml").write_text(table)
    proc = run_cli(*command, cwd=tmp_path)
    refused(proc)
    assert not (tmp_path / "pylmserv.lock").exists()
    no_secret_anywhere(proc, roots=[tmp_path, home], besides=[tmp_path / "pylmserv.toml"])


@pytest.mark.parametrize("lock", [
    # version 2 (today's) and version 1 (upgraded on read): neither carries it through
    ('version = 2\n[models.m]\nkind = "file"\nurl = "http://u:%s@127.0.0.1:9/m.gguf"\n'
     'hash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="\nmode = "flat"\nsize = 0\n'),
    ('version = 1\n[models.m]\nurl = "http://u:%s@127.0.0.1:9/m.gguf"\n'
     'hash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="\nmode = "flat"\n'),
])
def test_a_lock_with_credentials_is_refused(tmp_path, home, lock):
    (tmp_path / "pylmserv.toml").write_text('[models.m]\nurl = "http://127.0.0.1:9/m.gguf"\n')
    (tmp_path / "pylmserv.lock").write_text(lock % SECRET)
    for command in (("fetch", "m"), ("list",), ("prefetch",)):
        proc = run_cli(*command, cwd=tmp_path)
        assert proc.returncode == 2, (command, proc.stderr)
        assert "Traceback" not in proc.stderr
        no_secret_anywhere(proc)
    assert SECRET in (tmp_path / "pylmserv.lock").read_text()  # refused, not rewritten either


def test_hf_endpoint_with_credentials_is_refused(tmp_path, home):
    proc = run_cli("fetch", "hf://org/repo/m.gguf", "--trust-on-first-use", cwd=tmp_path,
                   env={"HF_ENDPOINT": f"http://user:{SECRET}@127.0.0.1:9"})
    refused(proc)
    no_secret_anywhere(proc, roots=[tmp_path])


def test_a_redirect_to_a_url_with_credentials_writes_no_secret(tmp_path, home):
    """The origin is clean; its redirect's Location carries userinfo (a hostile or careless
    server): the pin names the origin, and nothing written or printed has the secret."""
    with fault_server() as server:
        server.add("m.gguf", GGUF)
        server.redirect_base = server.base.replace("http://", f"http://user:{SECRET}@")
        url = server.url("redirect/m.gguf")
        add = run_cli("add", url, "--json", cwd=tmp_path)
        assert add.returncode == 0, add.stderr
        fetch = run_cli("-v", "fetch", "m", "--json", cwd=tmp_path)
        assert fetch.returncode == 0, fetch.stderr
        missing = run_cli("-v", "fetch", server.url("redirect/nothing-here.gguf"), "--trust-on-first-use",
                          cwd=tmp_path)  # an error path: 404 at the redirect target
        assert missing.returncode != 0 and "404" in missing.stderr
    assert url in (tmp_path / "pylmserv.lock").read_text()
    no_secret_anywhere(add, fetch, missing, roots=[tmp_path, home])


def test_netrc_is_the_way_that_works(tmp_path, home):
    """The hint is true: a server that wants a login gets it from ~/.netrc (requests reads
    it), and neither the lock nor any output carries the password."""
    import base64
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    want = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()

    class Guarded(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.headers.get("Authorization") != want:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="models"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(GGUF)))
            self.end_headers()
            self.wfile.write(GGUF)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Guarded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m.gguf"
        user_home = tmp_path / "user"
        user_home.mkdir()
        sha = hashlib.sha256(GGUF).hexdigest()
        denied = run_cli("fetch", url, "--sha256", sha, "--no-progress", cwd=tmp_path,
                         env={"HOME": str(user_home)})
        assert denied.returncode != 0 and "401" in denied.stderr
        netrc = user_home / ".netrc"
        netrc.write_text(f"machine 127.0.0.1 login user password {SECRET}\n")
        netrc.chmod(0o600)
        proj = tmp_path / "proj"
        proj.mkdir()
        added = run_cli("add", url, "--via", "python", cwd=proj, env={"HOME": str(user_home)})
        assert added.returncode == 0, added.stderr
        fetched = run_cli("fetch", "m", "--json", cwd=proj, env={"HOME": str(user_home)})
        assert fetched.returncode == 0, fetched.stderr
    finally:
        server.shutdown()
        server.server_close()
    from pylmserv.core.hashing import Hash

    assert Hash.of_bytes(GGUF).sri in (proj / "pylmserv.lock").read_text()
    no_secret_anywhere(denied, added, fetched, roots=[proj, home])
