"""What a download may never become, against a real fault-injecting server on 127.0.0.1:
a file stitched from two versions, an unbounded wait on a stalled server, or a hash of
the compressed transfer instead of the file Nix stores."""
from __future__ import annotations

import gzip
import os
import subprocess

import pytest

import pylmserv.transfer.download as dl
from pylmserv.core.errors import NetworkError, UsageError, VerificationError
from pylmserv.core.hashing import Hash
from pylmserv.transfer.download import download
from tests.conftest import run_cli

MB = 1 << 20


def fetch(url, tmp_path, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("tmp_dir", tmp_path / "tmp")
    return download(url, tmp_path / "out.bin", **kw)


def swap_on_request(server, path, new, nth):
    """Replace the file served at `path` by `new` just before the nth request is served."""
    seen = []

    def hook(srv, req):
        seen.append(req)
        if len(seen) == nth:
            srv.add(path, new)
    server.on_request = hook


# -- 1. no stitched files ---------------------------------------------------------------

@pytest.mark.parametrize("validator", ["none", "weak-etag"])
def test_changing_file_without_validator_or_hash_is_never_stitched(server, tmp_path, validator):
    """An attacker (or a careless mirror) swaps the file between range requests and offers
    nothing to notice it by. Without an expected hash, parallel ranges would assemble a
    file that never existed, and its hash would be pinned (prefetch, trust-on-first-use)."""
    old, new = os.urandom(6 * MB), os.urandom(6 * MB)
    url = server.add("f.bin", old)
    server.faults.no_etag = validator == "none"
    server.faults.weak_etag = validator == "weak-etag"
    swap_on_request(server, "/f.bin", new, nth=3)  # after the probe and one more request
    r = fetch(url, tmp_path, connections=8)
    body = (tmp_path / "out.bin").read_bytes()
    assert body in (old, new), "stitched from two versions"
    assert r.sha256 == Hash.of_bytes(body)
    # One plain stream after the 1-byte probe: no ranges of the body at all.
    assert [q.headers.get("Range") for q in server.requests] == ["bytes=0-0", None]


def test_tofu_fetch_of_a_changing_file_pins_one_real_version(home, server, tmp_path):
    """The whole chain: `fetch --trust-on-first-use` writes a pin that is the hash of one
    real version of the file, even while the server swaps it under the download."""
    old, new = os.urandom(5 * MB), os.urandom(5 * MB)
    url = server.add("m.bin", old)
    server.faults.no_etag = True
    swap_on_request(server, "/m.bin", new, nth=3)
    lock = tmp_path / "pylmserv.lock"
    proc = run_cli("--lock", lock, "fetch", "--trust-on-first-use", "--no-progress", url,
                   env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    import tomllib

    [pin] = tomllib.loads(lock.read_text())["models"].values()
    pinned = pin["hash"]
    assert pinned in (Hash.of_bytes(old).sri, Hash.of_bytes(new).sri), [(q.headers.get("Range"), q.status, q.sent) for q in server.requests]


def test_last_modified_alone_is_a_validator_for_parallel_ranges(server, tmp_path):
    data = os.urandom(4 * MB)
    url = server.add("f.bin", data)
    server.faults.no_etag = True
    server.faults.last_modified = "Wed, 21 Oct 2026 07:28:00 GMT"
    server.faults.rate = 4 * MB  # parts overlap in time: 1 s per connection, the ramp grows the pool
    fetch(url, tmp_path, connections=4)
    assert (tmp_path / "out.bin").read_bytes() == data
    ranged = [q for q in server.ranged_requests() if q.headers["Range"] != "bytes=0-0"]
    assert len(ranged) > 1 and server.peak_ranges > 1
    assert all(q.headers.get("If-Range") == server.faults.last_modified for q in ranged)


def test_expected_hash_allows_parallel_ranges_without_validator(server, tmp_path):
    """With a pin, a stitched file cannot get in (the hash check refuses it): ranges are fine."""
    data = os.urandom(4 * MB)
    url = server.add("f.bin", data)
    server.faults.no_etag = True
    server.faults.rate = 4 * MB  # as above
    fetch(url, tmp_path, connections=4, expected=Hash.of_bytes(data), size=len(data))
    assert (tmp_path / "out.bin").read_bytes() == data
    assert server.peak_ranges > 1


def test_stitched_file_with_expected_hash_is_refused_not_installed(server, tmp_path):
    old, new = os.urandom(4 * MB), os.urandom(4 * MB)
    url = server.add("f.bin", old)
    server.faults.no_etag = True
    swap_on_request(server, "/f.bin", new, nth=3)
    with pytest.raises(VerificationError, match="hash mismatch"):
        fetch(url, tmp_path, connections=4, expected=Hash.of_bytes(old), size=len(old))
    assert not (tmp_path / "out.bin").exists()


# -- 2. stalls give up in bounded time ----------------------------------------------------

def stall_for_good(server, after):
    """The first body response stops after `after` bytes; every later one sends nothing
    (the 1-byte range probe excepted): no retry ever makes progress again."""
    server.faults.stall_after, server.faults.stall_times, server.faults.stall_seconds = after, 10**6, 20.0

    def hook(srv, req):
        if req.headers.get("Range") == "bytes=0-0":
            return
        if srv.faults.stall_after == after and any(q.sent > 1 for q in srv.requests if q is not req):
            srv.faults.stall_after = 0
    server.on_request = hook


@pytest.mark.parametrize("ranges", [True, False])
def test_stalled_server_gives_up_by_the_stall_limit_not_the_attempt_count(server, tmp_path, monkeypatch, ranges):
    """Every response stops after 100 kB and never sends again. With unlimited attempts
    the only way out is the no-progress limit; it names what happened and the knob."""
    data = os.urandom(2 * MB)
    url = server.add("f.bin", data)
    server.faults.ignore_range = not ranges
    stall_for_good(server, 100_000)
    monkeypatch.setattr(dl, "MAX_ATTEMPTS", 10**6)
    with pytest.raises(NetworkError) as exc:
        fetch(url, tmp_path, expected=Hash.of_bytes(data), size=len(data), connections=2,
              stall_timeout=0.3, stall_limit=1.5)
    err = exc.value
    assert "stalled: no new data for" in err.message and "giving up" in err.message
    assert "--stall-limit" in err.hint and "PYLMSERV_STALL_LIMIT" in err.hint
    assert err.exit_code == 3
    assert not (tmp_path / "out.bin").exists()


def test_restarting_from_zero_is_not_progress(server, tmp_path, monkeypatch):
    """No ranges: each retry re-sends the same first 100 kB. Bytes already had before do
    not reset the limit, or a server stalling at the same spot would be retried forever."""
    data = os.urandom(1 * MB)
    url = server.add("f.bin", data)
    server.faults.ignore_range = True
    server.faults.stall_after, server.faults.stall_times, server.faults.stall_seconds = 100_000, 10**6, 20.0
    monkeypatch.setattr(dl, "MAX_ATTEMPTS", 10**6)
    with pytest.raises(NetworkError, match="stalled"):
        fetch(url, tmp_path, stall_timeout=0.2, stall_limit=1.2)
    full = [q for q in server.requests if "Range" not in q.headers]
    assert len(full) >= 2  # it did restart, and still gave up
    assert all(q.sent <= 100_000 for q in full)


def test_progress_keeps_a_slow_download_alive(server, tmp_path):
    """A server that stalls a few times but always sends more is not given up on."""
    data = os.urandom(2 * MB)
    url = server.add("f.bin", data)
    server.faults.stall_after, server.faults.stall_times, server.faults.stall_seconds = 300_000, 3, 5.0
    fetch(url, tmp_path, expected=Hash.of_bytes(data), size=len(data), connections=1,
          stall_timeout=0.3, stall_limit=3.0)
    assert (tmp_path / "out.bin").read_bytes() == data


def test_stall_limit_from_the_environment(server, tmp_path, monkeypatch):
    data = os.urandom(1 * MB)
    url = server.add("f.bin", data)
    stall_for_good(server, 50_000)
    monkeypatch.setattr(dl, "MAX_ATTEMPTS", 10**6)
    monkeypatch.setenv("PYLMSERV_STALL_LIMIT", "1")
    with pytest.raises(NetworkError, match="no new data") as exc:
        fetch(url, tmp_path, expected=Hash.of_bytes(data), stall_timeout=0.2)
    assert "now 1 s" in exc.value.hint


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon", "1e400"])
def test_bad_stall_limit_is_refused(tmp_path, monkeypatch, value):
    monkeypatch.setenv("PYLMSERV_STALL_LIMIT", value)
    with pytest.raises(UsageError, match="PYLMSERV_STALL_LIMIT must be a positive number"):
        download("http://127.0.0.1:9/x", tmp_path / "out", tmp_dir=tmp_path / "tmp")


def test_cli_stall_limit_is_one_line_exit_3(home, server, tmp_path):
    data = os.urandom(1 * MB)
    url = server.add("f.bin", data)
    server.faults.ignore_range = True
    server.faults.stall_after, server.faults.stall_times, server.faults.stall_seconds = 10_000, 10**6, 20.0
    proc = run_cli("fetch", url, "--sha256", Hash.of_bytes(data).hex, "--stall-limit", "1", "--no-progress",
                   env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "stalled: no new data" in proc.stderr and "--stall-limit" in proc.stderr


# -- 6. Content-Encoding: gzip ------------------------------------------------------------

def test_gzip_encoded_body_is_stored_decoded(server, tmp_path):
    data = os.urandom(300_000) + b"\0" * 2_000_000  # compressible: the encoded size differs a lot
    url = server.add("f.bin", data)
    server.faults.gzip = True
    r = fetch(url, tmp_path, expected=Hash.of_bytes(data), size=len(data), connections=8)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert r.sha256 == Hash.of_bytes(data) and r.size == len(data)


@pytest.mark.nix
def test_gzip_encoded_body_hash_matches_nix_prefetch_url(server, tmp_path, nix):
    """Nix's fetchers decode a Content-Encoding: gzip body and hash the result: same pin."""
    data = b"model weights " * 50_000 + os.urandom(1000)
    url = server.add("w.bin", data)
    server.faults.gzip = True
    out = subprocess.run(["nix-prefetch-url", "--type", "sha256", url], capture_output=True, text=True,
                         timeout=120, check=True)
    nix_hash = Hash.parse(out.stdout.strip(), algo="sha256")
    r = fetch(url, tmp_path)  # no expected hash: what would be pinned
    assert r.sha256 == nix_hash
    assert r.sha256 != Hash.of_bytes(gzip.compress(data, mtime=0))


def test_truncated_gzip_body_is_not_accepted(server, tmp_path, monkeypatch):
    data = os.urandom(400_000)
    url = server.add("f.bin", data)
    server.faults.gzip = True
    server.faults.cut_at, server.faults.cut_times = 200_000, 10**6
    monkeypatch.setattr(dl, "MAX_ATTEMPTS", 2)
    with pytest.raises(NetworkError):
        fetch(url, tmp_path)
    assert not (tmp_path / "out.bin").exists()


def test_unknown_content_encoding_is_refused_cleanly(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"\x8b\x00\x80opaque"
            self.send_response(200)
            self.send_header("Content-Encoding", "br")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        with pytest.raises(NetworkError, match="Content-Encoding 'br'"):
            fetch(f"http://127.0.0.1:{httpd.server_address[1]}/x", tmp_path)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not (tmp_path / "out.bin").exists()
