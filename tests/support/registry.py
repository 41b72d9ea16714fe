"""Real registry servers for the sharing tests, all on 127.0.0.1 with temp configs:

- `registry(tmp, auth=...)`: Debian's docker-registry (CNCF distribution 2.8), anonymous,
  with htpasswd basic auth (apache2-utils' htpasswd writes the bcrypt file), or with token
  auth against `token_service`;
- `token_service(...)`: the bearer-token side of distribution's token auth spec
  (https://distribution.github.io/distribution/spec/auth/token/): checks a basic login,
  answers {"token": JWT} signed ES256 with an x5c header whose certificate the registry
  trusts (rootcertbundle);
- `nginx_dir(root)`: nginx-light serving a directory read-only (a store's blobs/ as a mirror,
  or an origin);
- `need(tool)`: a missing tool fails the test under CI=true, else skips it.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

TOOLS = {"docker-registry": "docker-registry", "skopeo": "skopeo", "nginx": "nginx-light",
         "htpasswd": "apache2-utils"}


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is None:
        msg = f"{tool} is not installed (apt-get install {TOOLS.get(tool, tool)}; scripts/setup-dev.sh does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port}: {log.read_text(errors='replace')[-2000:]}")


class Server:
    def __init__(self, proc, port, log):
        self.proc, self.port, self.log = proc, port, log

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def registry(tmp: Path, auth: str = "none", users=None, token=None):
    """docker-registry on 127.0.0.1:free port. auth: none | htpasswd (users {name: pw}) | token."""
    binary = need("docker-registry")
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = ["version: 0.1", "log:", "  level: warn", "  accesslog:", "    disabled: true", "storage:",
           "  filesystem:", f"    rootdirectory: {tmp / 'data'}", "  delete:", "    enabled: true",
           "http:", f"  addr: 127.0.0.1:{port}", f"  secret: {uuid.uuid4().hex}"]
    if auth == "htpasswd":
        htpasswd = need("htpasswd")
        pw = tmp / "htpasswd"
        for i, (user, password) in enumerate((users or {}).items()):
            # -i: the password on stdin, never in argv
            subprocess.run([htpasswd, "-iB"] + (["-c"] if i == 0 else []) + [str(pw), user],
                           input=password.encode(), check=True, capture_output=True)
        cfg += ["auth:", "  htpasswd:", "    realm: pylmserv-test", f"    path: {pw}"]
    elif auth == "token":
        cfg += ["auth:", "  token:", f"    realm: {token.url}/token", f"    service: {token.service}",
                f"    issuer: {token.issuer}", f"    rootcertbundle: {token.cert_path}"]
    (tmp / "config.yml").write_text("\n".join(cfg) + "\n")
    log = tmp / "registry.log"
    with open(log, "wb") as out:
        # distribution reads REGISTRY_* variables as config overrides (REGISTRY_AUTH_FILE, the
        # containers tools' auth file variable, would become auth.file): none reach it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        proc = subprocess.Popen([binary, "serve", str(tmp / "config.yml")], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    server = Server(proc, port, log)
    try:
        _wait_port(port, proc, log)
        yield server
    finally:
        server.stop()


# -- the token service -------------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Issues registry tokens for users {name: password}; `grants` {name: actions} limits them."""

    def __init__(self, tmp: Path, users: dict, grants=None):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users = dict(users)
        self.grants = grants or {}
        self.service, self.issuer = "pylmserv-test-registry", "pylmserv-test-issuer"
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pylmserv test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.cert_path = Path(tmp) / "token-cert.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.requests = []  # (authorization header present, scope)

    def sign(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def issue(self, user, scope: str) -> str:
        access = []
        for item in scope.split(" ") if scope else []:
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            allowed = self.grants.get(user, ["pull", "push"]) if user else []
            access.append({"type": kind, "name": name, "actions": [a for a in wanted if a in allowed]})
        now = int(time.time())
        return self.sign({"iss": self.issuer, "sub": user or "", "aud": self.service, "exp": now + 300,
                          "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access})


@contextlib.contextmanager
def token_service(tmp: Path, users: dict, grants=None):
    service = TokenService(tmp, users, grants)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            q = parse_qs(urlsplit(self.path).query)
            user = None
            auth = self.headers.get("Authorization", "")
            service.requests.append((bool(auth), " ".join(q.get("scope", []))))
            if auth.startswith("Basic "):
                name, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                if service.users.get(name) != pw:
                    body = b'{"error":"bad login"}'
                    self.send_response(401)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                user = name
            body = json.dumps({"token": service.issue(user, " ".join(q.get("scope", [])))}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    service.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield service
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- nginx ------------------------------------------------------------------------------------

@contextlib.contextmanager
def nginx_dir(root: Path, tmp: Path):
    """nginx-light serving `root` read-only on 127.0.0.1:free port (Range, ETag: nginx's own)."""
    binary = need("nginx")
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "nginx.conf"
    # As root nginx's workers would drop to nobody, who cannot read pytest's 0700 temp dirs.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf.write_text(f"""daemon off;
{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  sendfile on;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    disable_symlinks off;
    location / {{ limit_except GET HEAD {{ deny all; }} }}
  }}
}}
""")
    log = tmp / "nginx.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp)], stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    try:
        _wait_port(port, proc, log)
        yield server
    finally:
        server.stop()


def write_auth_file(path: Path, host: str, user: str, password: str) -> Path:
    """A containers auth.json with one login (what `skopeo login` writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    os.chmod(path, 0o600)
    return path


def http_get(url: str, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback only
        return r.status, dict(r.headers), r.read()
