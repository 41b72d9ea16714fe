"""What the download's speed work must not change: write-behind (core.fsutil.start_writeback)
moves writeback earlier but never replaces the fsync before the install; the transport on
urllib3 alone (no requests) keeps requests' proxy rules (its netrc logins and origin-only
credentials: tests/test_url_secrets.py, tests/test_download.py)."""
from __future__ import annotations

import os
import sys

import pytest

import pylmserv.transfer.download as dl
import pylmserv.transfer.partial as partial
from pylmserv.core import fsutil
from pylmserv.core.hashing import Hash

MB = 1 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_starts_on_a_file_and_refuses_what_is_no_file(tmp_path):
    f = tmp_path / "f"
    with open(f, "wb") as out:
        out.write(os.urandom(MB))
        out.flush()
        assert fsutil.start_writeback(out.fileno()) is True
        assert fsutil.start_writeback(out.fileno(), MB // 2, MB // 4) is True
    r, w = os.pipe()
    try:
        assert fsutil.start_writeback(r) is False  # ESPIPE: a hint refused, not an error
    finally:
        os.close(r), os.close(w)
    closed = os.open(f, os.O_RDONLY)
    os.close(closed)
    assert fsutil.start_writeback(closed) is False  # EBADF


@pytest.mark.parametrize("ranges", [True, False], ids=["parts", "single-stream"])
def test_the_partial_is_fsynced_before_it_is_installed_and_written_behind(server, tmp_path, monkeypatch, ranges):
    data = os.urandom(6 * MB + 123)
    url = server.add("f.bin", data)
    server.faults.ignore_range = not ranges
    dest = tmp_path / "out.bin"
    events = []
    real_fsync, real_replace, real_wb = os.fsync, os.replace, fsutil.start_writeback

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, *a, **kw)

    def writeback(fd, *a):
        events.append(("writeback", os.readlink(f"/proc/self/fd/{fd}")))
        return real_wb(fd, *a)

    monkeypatch.setattr(dl.os, "fsync", fsync)
    monkeypatch.setattr(dl.os, "replace", replace)
    monkeypatch.setattr(dl, "start_writeback", writeback)
    monkeypatch.setattr(partial, "start_writeback", writeback)
    monkeypatch.setattr(dl, "WRITEBACK_EVERY", MB)  # the single stream hints inline, every MiB
    r = dl.download(url, dest, expected=Hash.of_bytes(data), size=len(data), connections=2,
                    progress=False, tmp_dir=tmp_path / "tmp")
    assert dest.read_bytes() == data and r.sha256 == Hash.of_bytes(data)
    installs = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(dest)]
    assert len(installs) == 1
    partial_path = events[installs[0]][1]
    synced = [i for i, e in enumerate(events) if e == ("fsync", partial_path)]
    assert synced and synced[-1] < installs[0], events  # durable before it has its name
    if not ranges:  # inline hints: one per MiB or more written (reads of up to 256 KiB), before the fsync
        hints = [i for i, e in enumerate(events) if e == ("writeback", partial_path)]
        assert 4 <= len(hints) <= 6 and hints[-1] < synced[-1], events


def test_downloads_go_through_the_proxy_the_environment_names(tmp_path, monkeypatch):
    """The download transport (urllib3, not requests) keeps requests' proxy rules: http_proxy
    is used, NO_PROXY exempts a host. The 'proxy' is a loopback server that answers the
    absolute-form request line for a host that does not exist."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pylmserv.core.errors import NetworkError

    data = os.urandom(300_000)
    seen = []

    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
        url = "http://models.invalid/m.bin"
        r = dl.download(url, tmp_path / "out.bin", expected=Hash.of_bytes(data), size=len(data),
                        progress=False, tmp_dir=tmp_path / "tmp")
        assert (tmp_path / "out.bin").read_bytes() == data and r.size == len(data)
        assert seen and all(p.startswith("http://models.invalid/m.bin") for p in seen)
        monkeypatch.setenv("no_proxy", "models.invalid")
        seen.clear()
        with pytest.raises(NetworkError, match="cannot reach"):
            dl.download(url, tmp_path / "out2.bin", expected=Hash.of_bytes(data), size=len(data),
                        progress=False, tmp_dir=tmp_path / "tmp")
        assert seen == []
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.parametrize("env", [
    {},
    {"HTTP_PROXY": "http://127.0.0.1:3128"},
    {"Http_Proxy": "127.0.0.1:3128"},
    {"all_proxy": "http://127.0.0.1:3128"},
    {"ALL_PROXY": "http://127.0.0.1:3128", "NO_PROXY": "models.invalid"},
    {"no_proxy": "*"},
    {"HTTPS_PROXY": "http://127.0.0.1:3128", "PATH_PROXYISH": "x"},
], ids=["none", "upper", "mixed-case-no-scheme", "all", "all+no_proxy", "no_proxy-only", "https-only"])
def test_the_proxy_choice_without_urllib_request_agrees_with_it(monkeypatch, env):
    """_proxy_for skips importing urllib.request when no *_proxy variable is set (Linux):
    it must choose exactly what urllib.request's rules choose, with or without them."""
    import urllib.request

    from pylmserv.transfer.http import _proxy_for

    for k in list(os.environ):
        if k.lower().endswith("_proxy"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for url in ("http://models.invalid/m.gguf", "https://models.invalid:8443/m.gguf"):
        proxies = urllib.request.getproxies()
        scheme = url.split(":")[0]
        want = proxies.get(scheme) or proxies.get("all")
        if want and urllib.request.proxy_bypass("models.invalid"):
            want = None
        if want and "://" not in want:
            want = "http://" + want
        assert _proxy_for(url) == want
