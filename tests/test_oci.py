"""The OCI distribution client against a real registry (Debian's docker-registry, CNCF
distribution 2.8) on 127.0.0.1: basic auth from an auth file, the bearer-token challenge
flow with a token service, streamed monolithic and chunked uploads, ranged resume, and
hostile servers (wrong bytes, a redirect off loopback)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pylmserv.core.errors import NetworkError, VerificationError
from pylmserv.core.hashing import Hash
from pylmserv.transfer import oci
from tests.support.registry import http_get, registry, token_service, write_auth_file

PASSWORD = "pa55-Zq8!never-print-me"


def sha(data: bytes) -> Hash:
    return Hash("sha256", hashlib.sha256(data).digest())


def blob_file(tmp_path: Path, size: int, seed: int = 1) -> Path:
    path = tmp_path / f"blob-{seed}-{size}"
    block = hashlib.sha256(str(seed).encode()).digest() * 4096
    with open(path, "wb") as f:
        left = size
        while left:
            f.write(block[:left])
            left -= min(left, len(block))
    return path


def file_hash(path: Path) -> Hash:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return Hash("sha256", h.digest())


@pytest.fixture
def auth_env(tmp_path, monkeypatch):
    """No auth file but the one a test writes (REGISTRY_AUTH_FILE), no docker config."""
    monkeypatch.setenv("HOME", str(tmp_path / "userhome"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    path = tmp_path / "auth" / "auth.json"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    return path


def test_reference_and_transport_rules():
    ref = oci.OciRef.parse("oci://127.0.0.1:5000/team/models")
    assert (ref.host, ref.repo) == ("127.0.0.1:5000", "team/models")
    for bad in ("oci://user:pw@host/repo", "oci://host", "oci://host/Upper", "https://host/repo", "oci://host:x/r"):
        with pytest.raises(Exception) as e:
            oci.OciRef.parse(bad)
        assert "pw" not in str(e.value).replace("pw@", "") or "credentials" in str(e.value)
    assert oci.Registry(ref).scheme == "http"
    assert oci.Registry(oci.OciRef.parse("oci://[::1]:5000/r")).scheme == "http"
    assert oci.Registry(oci.OciRef.parse("oci://registry.example/r"), insecure=[]).scheme == "https"
    assert oci.Registry(oci.OciRef.parse("oci://10.0.0.7:5000/r"), insecure=["10.0.0.7:5000"]).scheme == "http"
    with pytest.raises(NetworkError, match="plain HTTP is only for loopback"):
        oci.check_url("http://203.0.113.9/v2/", insecure=[])
    oci.check_url("http://127.8.9.10:1/v2/", insecure=[])
    oci.check_url("https://203.0.113.9/v2/", insecure=[])


def test_auth_file_order_and_keys(tmp_path):
    home = tmp_path / "h"
    docker = home / ".docker" / "config.json"
    write_auth_file(docker, "https://127.0.0.1:5000/v1/", "dockeruser", "Sekr1t-d")
    env = {"HOME": str(home)}
    creds = oci.find_credentials("127.0.0.1:5000", "r", env)
    assert creds.username == "dockeruser" and "Sekr1t" not in repr(creds)
    containers = home / ".config" / "containers" / "auth.json"
    write_auth_file(containers, "127.0.0.1:5000", "podman", "p")
    assert oci.find_credentials("127.0.0.1:5000", "r", env).username == "podman"
    # A namespace-specific login wins over the host's.
    data = json.loads(containers.read_text())
    data["auths"]["127.0.0.1:5000/team"] = {"auth": base64.b64encode(b"teamuser:t").decode()}
    containers.write_text(json.dumps(data))
    assert oci.find_credentials("127.0.0.1:5000", "team/models", env).username == "teamuser"
    assert oci.find_credentials("127.0.0.1:5000", "other", env).username == "podman"
    # REGISTRY_AUTH_FILE replaces the containers locations; docker's config stays the fallback.
    env["REGISTRY_AUTH_FILE"] = str(tmp_path / "none.json")
    assert oci.find_credentials("127.0.0.1:5000", "r", env).username == "dockeruser"
    assert oci.find_credentials("127.0.0.1:5001", "r", env) is None
    secret = repr(oci.Credentials("u", PASSWORD, "x")) + str(oci.Credentials("u", PASSWORD, "x"))
    assert PASSWORD not in secret


def test_push_pull_basic_auth(tmp_path, auth_env):
    data = blob_file(tmp_path, 3 * (1 << 20) + 17)
    digest = file_hash(data)
    with registry(tmp_path / "reg", auth="htpasswd", users={"alice": PASSWORD}) as reg:
        ref = oci.OciRef.parse(f"oci://{reg.host}/team/models")
        anon = oci.Registry(ref)
        with pytest.raises(NetworkError) as e:
            anon.blob_info(digest)
        assert "no auth file" in str(e.value)

        write_auth_file(auth_env, reg.host, "alice", PASSWORD)
        client = oci.Registry(ref)
        assert client.blob_info(digest) is None
        assert client.push_blob(data, digest) is True
        assert client.push_blob(data, digest) is False  # already there: nothing sent
        info = client.blob_info(digest)
        assert info.size == data.stat().st_size

        small = blob_file(tmp_path, 2_500_000, seed=2)
        assert client.push_blob(small, file_hash(small), chunk_size=1 << 20) is True  # 3 PATCHes

        # What the registry holds is the file, byte for byte (read back without pylmserv).
        auth = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        status, _, body = http_get(f"{reg.url}/v2/team/models/blobs/sha256:{file_hash(small).hex}",
                                   {"Authorization": auth})
        assert status == 200 and body == small.read_bytes()

        out = tmp_path / "out" / "blob"
        assert client.pull_blob(digest, out, size=data.stat().st_size) == data.stat().st_size
        assert out.read_bytes() == data.read_bytes()

        # Resume: a partial left by a killed pull gets only the rest.
        part = data.read_bytes()[: 1_000_000]
        out2 = tmp_path / "out" / "resumed"
        out2.write_bytes(part)
        got = client.pull_blob(digest, out2, size=data.stat().st_size)
        assert got == data.stat().st_size - len(part)
        assert out2.read_bytes() == data.read_bytes()
        # A partial whose bytes are wrong is caught by the digest and deleted.
        out3 = tmp_path / "out" / "bad-partial"
        out3.write_bytes(b"x" * 1000)
        with pytest.raises(VerificationError):
            client.pull_blob(digest, out3, size=data.stat().st_size)
        assert not out3.exists()

        manifest = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                               "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                                          "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                                          "size": 2},
                               "layers": [{"mediaType": "application/octet-stream",
                                           "digest": f"sha256:{digest.hex}", "size": data.stat().st_size}]},
                              sort_keys=True).encode()
        empty = tmp_path / "empty.json"
        empty.write_bytes(b"{}")
        client.push_blob(empty, file_hash(empty))
        mdigest = client.put_manifest("v1", manifest)
        body, media, got_digest = client.get_manifest("v1")
        assert body == manifest and media == oci.OCI_MANIFEST and got_digest == mdigest
        assert client.get_manifest(f"sha256:{mdigest.hex}")[0] == manifest

        # Wrong password: refused, and the password is nowhere in the error.
        write_auth_file(auth_env, reg.host, "alice", PASSWORD + "x")
        with pytest.raises(NetworkError) as e:
            oci.Registry(ref).blob_info(digest)
        text = f"{e.value} {e.value.hint}"
        assert "refused the credentials" in text and PASSWORD not in text


def test_bearer_token_flow(tmp_path, auth_env):
    data = blob_file(tmp_path, 1_500_000, seed=3)
    digest = file_hash(data)
    with token_service(tmp_path, {"bob": PASSWORD}, grants={"bob": ["pull", "push"]}) as tokens, \
            registry(tmp_path / "reg", auth="token", token=tokens) as reg:
        ref = oci.OciRef.parse(f"oci://{reg.host}/models/tiny")
        # Anonymous: the token service grants nothing, so the registry refuses.
        with pytest.raises(NetworkError, match="refused anonymous access"):
            oci.Registry(ref).blob_info(digest)
        write_auth_file(auth_env, reg.host, "bob", PASSWORD)
        client = oci.Registry(ref)
        assert client.push_blob(data, digest) is True
        out = tmp_path / "pulled"
        client.pull_blob(digest, out)
        assert out.read_bytes() == data.read_bytes()
        scopes = [scope for authed, scope in tokens.requests if authed]
        # (distribution lists a scope's actions in no fixed order)
        assert any(s.startswith("repository:models/tiny:") and set(s.rsplit(":", 1)[1].split(",")) == {"pull", "push"}
                   for s in scopes), tokens.requests
        # The password went to the token realm as basic auth, never to the registry.
        assert PASSWORD not in reg.log.read_text(errors="replace")
        # A wrong password: the token service refuses, and the error names the auth file, not the secret.
        write_auth_file(auth_env, reg.host, "bob", "x" + PASSWORD)
        with pytest.raises(NetworkError) as e:
            oci.Registry(ref).blob_info(digest)
        text = f"{e.value} {e.value.hint}"
        assert "token service answered HTTP 401" in text and str(auth_env) in text and PASSWORD not in text


class _Liar(BaseHTTPRequestHandler):
    """A registry that answers every blob with other bytes, or redirects off loopback."""

    protocol_version = "HTTP/1.1"
    mode = "wrong"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.mode == "redirect":
            self.send_response(307)
            self.send_header("Location", "http://203.0.113.9/blob")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"not the model" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def liar():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_wrong_bytes_are_refused_and_deleted(tmp_path, liar, auth_env):
    _Liar.mode = "wrong"
    ref = oci.OciRef.parse(f"oci://127.0.0.1:{liar.server_address[1]}/m")
    want = sha(b"the real model")
    out = tmp_path / "o"
    with pytest.raises(VerificationError, match=want.hex):
        oci.Registry(ref).pull_blob(want, out, size=14)
    assert not out.exists()


def test_redirect_off_loopback_to_plain_http_is_refused(tmp_path, liar, auth_env):
    _Liar.mode = "redirect"
    ref = oci.OciRef.parse(f"oci://127.0.0.1:{liar.server_address[1]}/m")
    with pytest.raises(NetworkError, match="203.0.113.9.*plain HTTP is only for loopback"):
        oci.Registry(ref, insecure=[]).pull_blob(sha(b"x"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_authorization_never_follows_a_redirect(tmp_path, auth_env):
    """A registry that wants a login and redirects blob GETs to storage elsewhere (S3-style):
    the login goes to the registry only, the storage server never sees it."""
    body = b"GGUF the model bytes" * 5000
    seen = []

    class Storage(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(dict(self.headers))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    storage = ThreadingHTTPServer(("127.0.0.1", 0), Storage)
    threading.Thread(target=storage.serve_forever, daemon=True).start()

    class Reg(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            if not self.headers.get("Authorization", "").startswith("Basic "):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="r"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{storage.server_address[1]}/bucket/blob?sig=x")
            self.send_header("Content-Length", "0")
            self.end_headers()

    reg = ThreadingHTTPServer(("127.0.0.1", 0), Reg)
    threading.Thread(target=reg.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{reg.server_address[1]}"
        write_auth_file(auth_env, host, "erin", PASSWORD)
        out = tmp_path / "blob"
        oci.Registry(oci.OciRef.parse(f"oci://{host}/m")).pull_blob(sha(body), out, size=len(body))
        assert out.read_bytes() == body
        assert seen and all("Authorization" not in h for h in seen)
    finally:
        for s in (storage, reg):
            s.shutdown()
            s.server_close()
