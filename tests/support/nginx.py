"""A real nginx (Debian nginx-light) serving a directory on 127.0.0.1, as a team would
serve a Nix binary cache or a pylmserv build cache. Foreground, own prefix, own logs."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def have_nginx() -> bool:
    return os.access(NGINX, os.X_OK)


def require_nginx() -> None:
    """Fail in CI (setup-dev.sh installs nginx-light), skip on a machine without it."""
    import pytest

    if not have_nginx():
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed; scripts/setup-dev.sh installs nginx-light")
        pytest.skip("nginx not installed (apt-get install nginx-light)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(root: Path, workdir: Path) -> Iterator[str]:
    """Serve `root` read-only at the yielded http://127.0.0.1:PORT until the block ends."""
    require_nginx()
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {workdir}/access.log;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  types {{ text/x-nix-narinfo narinfo; application/json json; }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{ try_files $uri =404; }}
  }}
}}
""")
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(f"nginx did not start: {err}"
                                       f"{(workdir / 'error.log').read_text() if (workdir / 'error.log').exists() else ''}")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
