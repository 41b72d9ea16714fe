"""The download engine against a real loopback HTTP server with faults injected on demand."""
from __future__ import annotations

import json
import os
import time

import pytest

import pylmserv.transfer.download as dl
from pylmserv.transfer.download import DiskSpaceError, download
from pylmserv.core.errors import NetworkError, VerificationError
from pylmserv.core.hashing import EMPTY_SHA256, Hash
from tests.support.faultserver import fault_server

MB = 1 << 20


@pytest.fixture
def data():
    return os.urandom(4 * MB + 12345)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path / "tmp"


def fetch(url, tmp_path, data=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("tmp_dir", tmp_path / "tmp")
    if data is not None:
        kw.setdefault("expected", Hash.of_bytes(data))
        kw.setdefault("size", len(data))
    return download(url, tmp_path / "out.bin", **kw)


def break_after_cuts(server, cut_at, parts):
    """Cut the probe and every first part response at `cut_at`, then answer 503 forever:
    the download fails with some bytes of every part on disk."""
    server.faults.cut_at, server.faults.cut_times = cut_at, parts + 1

    def hook(srv, req):
        if len(srv.requests) > parts + 1:
            srv.faults.fail_times = 10**6

    server.on_request = hook


def heal(server):
    server.on_request = None
    server.faults.fail_times = server.faults.cut_times = 0


def kept_bytes(tmp_dir):
    """Bytes a failed download kept for resume, as its sidecar state records them."""
    [state] = tmp_dir.glob("*.state.json")
    return sum(done for _, _, done in json.loads(state.read_text())["parts"])


def leftovers(tmp_path):
    d = tmp_path / "tmp"
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.exists() else []


def test_parallel_ranges_write_one_verified_file(server, data, tmp_path):
    url = server.add("f.bin", data)
    r = fetch(url, tmp_path, data, connections=4)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert r.sha256 == Hash.of_bytes(data) and r.size == len(data)
    ranged = [q for q in server.ranged_requests() if q.headers["Range"] != "bytes=0-0"]
    # 1 MiB parts (the minimum), each asked once, by at most 4 connections at a time.
    assert sorted(q.headers["Range"] for q in ranged) == sorted(f"bytes={a}-{min(a + MB, len(data)) - 1}"
                                                                for a in range(0, len(data), MB))
    assert server.peak_ranges <= 4
    assert all(q.headers.get("If-Range") == server.etags["/f.bin"] for q in ranged)
    assert server.bytes_sent == len(data) + 1  # the file once, plus the 1-byte probe
    assert leftovers(tmp_path) == []


def test_cut_mid_body_resumes_each_part_without_resending(server, data, tmp_path):
    url = server.add("f.bin", data)
    server.faults.cut_at, server.faults.cut_times = 300_000, 4
    r = fetch(url, tmp_path, data, connections=4)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert server.bytes_sent <= len(data) + 1  # resumed at the cut: no byte sent twice
    assert r.bytes_downloaded == len(data)


def test_server_ignoring_range_gets_one_plain_stream(server, data, tmp_path):
    url = server.add("f.bin", data)
    server.faults.ignore_range = True
    fetch(url, tmp_path, data, connections=8)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert [q.status for q in server.requests] == [200]  # the probe's 200 body is the download


def test_wrong_content_range_is_never_spliced(server, data, tmp_path):
    url = server.add("f.bin", data)
    server.faults.wrong_content_range = True
    fetch(url, tmp_path, data, connections=4)
    assert (tmp_path / "out.bin").read_bytes() == data
    # After the mismatch the engine stopped using ranges and streamed the file whole.
    assert server.requests[-1].headers.get("Range") is None


def test_416_on_ranges_falls_back_to_a_plain_stream(server, data, tmp_path):
    url = server.add("f.bin", data)
    server.faults.range_416 = True
    fetch(url, tmp_path, data, connections=4)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert 416 in [q.status for q in server.requests]


def test_file_and_etag_changing_mid_download_restarts_from_the_new_file(server, tmp_path):
    old, new = os.urandom(4 * MB), os.urandom(4 * MB)
    url = server.add("f.bin", old)
    server.faults.cut_at, server.faults.cut_times = 200_000, 3
    seen = []

    def swap(srv, req):
        seen.append(req)
        if len(seen) == 3:  # after the probe and the first part started: a new upload
            srv.add("f.bin", new)

    server.on_request = swap
    r = fetch(url, tmp_path, connections=4)  # no expected hash: the result must be one whole version
    assert (tmp_path / "out.bin").read_bytes() == new
    assert r.sha256 == Hash.of_bytes(new)
    # Some resumed part sent If-Range with the old ETag and got the whole new file (200).
    assert any(q.status == 200 and "Range" in q.headers for q in server.requests)


def test_partial_from_an_older_file_version_is_discarded(server, tmp_path, monkeypatch):
    old, new = os.urandom(3 * MB), os.urandom(3 * MB)
    url = server.add("f.bin", old)
    monkeypatch.setattr(dl, "MAX_ATTEMPTS", 1)
    break_after_cuts(server, 500_000, parts=3)
    with pytest.raises(NetworkError, match="keeps failing"):
        fetch(url, tmp_path, connections=3)
    assert any(n.endswith(".state.json") for n in leftovers(tmp_path))  # partial kept for resume
    server.add("f.bin", new)  # new content, new ETag
    heal(server)
    fetch(url, tmp_path, connections=3)
    assert (tmp_path / "out.bin").read_bytes() == new


def test_in_process_resume_fetches_only_missing_bytes(server, data, tmp_path, monkeypatch):
    url = server.add("f.bin", data)
    monkeypatch.setattr(dl, "MAX_ATTEMPTS", 1)
    break_after_cuts(server, 400_000, parts=4)
    with pytest.raises(NetworkError, match="keeps failing") as exc:
        fetch(url, tmp_path, data, connections=4)
    assert "partial download is kept" in exc.value.hint
    server.wait_idle()  # the first run's last answers have ended: their counts are final
    sent = sum(q.sent for q in server.requests if q.status == 206 and q.headers["Range"] != "bytes=0-0")
    # What the client kept, from its own state: bytes the server had sent into a connection
    # the client was already abandoning (another part failed first) are not on disk.
    saved = kept_bytes(tmp_path / "tmp")
    assert 0 < saved <= sent < len(data)  # some bytes on disk, the file not complete
    assert not (tmp_path / "out.bin").exists()
    heal(server)
    server.reset_counters()
    r = fetch(url, tmp_path, data, connections=4)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert server.bytes_sent == len(data) - saved + 1  # exactly the missing bytes (+ the probe's byte)
    assert r.bytes_downloaded == server.bytes_sent - 1


@pytest.mark.parametrize("status", [403, 429])
def test_refused_parallel_ranges_fall_back_to_fewer_connections(server, tmp_path, status):
    data = os.urandom(16 * MB)
    url = server.add("f.bin", data)
    server.faults.max_parallel, server.faults.parallel_status = 2, status
    server.faults.rate = 4 * MB  # capped connections: the pool grows past 2 and is refused
    fetch(url, tmp_path, data, connections=4)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert status in [q.status for q in server.requests]
    assert server.bytes_sent == len(data) + 1 + sum(q.sent for q in server.requests if q.status == status)


def fetch_shaped(server, tmp_path, mb, on_request=None, **faults):
    """Fetch an `mb` MiB file with 8 connections through shaped faults; returns the peak of
    parallel ranges the server saw."""
    data = os.urandom(mb * MB)
    url = server.add("f.bin", data)
    for name, value in faults.items():
        setattr(server.faults, name, value)
    server.on_request = on_request
    fetch(url, tmp_path, data, connections=8)
    assert (tmp_path / "out.bin").read_bytes() == data
    return server.peak_ranges


def test_rate_limited_connections_run_in_parallel(server, tmp_path):
    """Each connection capped (a CDN's per-stream limit): the pool grows to all of them."""
    assert fetch_shaped(server, tmp_path, 24, rate=4 * MB) == 8


def test_connections_that_do_not_add_throughput_are_given_back(server, tmp_path):
    """One link shared by every connection (what loopback or a LAN mirror is): a second
    connection adds nothing, so the pool goes back to one instead of growing to 8."""
    assert fetch_shaped(server, tmp_path, 16, link_rate=8 * MB) == 2
    ranges = [q for q in server.requests if q.status == 206 and q.headers["Range"] != "bytes=0-0"]
    assert len(ranges) < 16  # runs of parts taken together, not one request per 1 MiB part (16)


def test_a_slow_first_byte_is_not_taken_for_a_doubling_that_did_not_pay(server, tmp_path, monkeypatch):
    """New connections that take long to answer (a TLS handshake, a far CDN) are measured
    once their bytes flow, so a per-connection cap still gets the whole pool.

    Event-driven: each new connection is held until the ramp has seen it not flowing yet,
    then for several measuring intervals; an interval measured meanwhile would be a doubling
    that did not pay, and the pool would stop short of 8."""
    import threading

    from pylmserv.transfer import scheduler

    waiting = threading.Event()
    real_flowing = scheduler.PartScheduler._flowing

    def flowing(self):
        ok = real_flowing(self)
        if not ok:
            waiting.set()
        return ok

    monkeypatch.setattr(scheduler.PartScheduler, "_flowing", flowing)

    def slow_start(srv, req):
        if req.headers.get("Range", "bytes=0-0") != "bytes=0-0" and len(srv.ranged_requests()) > 1:
            assert waiting.wait(30), "the ramp never waited for a new connection"
            time.sleep(2 * scheduler.RAMP_INTERVAL)

    assert fetch_shaped(server, tmp_path, 24, on_request=slow_start, rate=4 * MB) == 8


def test_ramp_decisions():
    """The ramp's decision is a function of what it measured: no clock, no threads."""
    from pylmserv.transfer.scheduler import RAMP_BUSY, RAMP_GAIN, Sample, ramp_step

    mb = float(MB)
    one = Sample(1, 4 * mb, 0.02)  # a capped connection, waiting on the link
    assert ramp_step(one, None, allowed=8, queued=50) == 1
    two = Sample(2, 8 * mb, 0.02)
    assert ramp_step(two, one, allowed=8, queued=50) == 2  # it paid: double again
    assert ramp_step(Sample(4, 16 * mb, 0.02), two, allowed=8, queued=2) == 2  # no more than is queued
    assert ramp_step(Sample(8, 32 * mb, 0.02), Sample(4, 16 * mb, 0.02), allowed=8, queued=50) == -8  # full
    # One shared link: the second connection did not raise the rate by RAMP_GAIN: back to one.
    assert ramp_step(Sample(2, 4 * mb * (RAMP_GAIN - 0.01), 0.02), one, allowed=8, queued=50) == -1
    # A fast local link: the one connection keeps the CPU busy, so no second one is tried.
    assert ramp_step(Sample(1, 900 * mb, RAMP_BUSY), None, allowed=8, queued=50) == -1
    assert ramp_step(Sample(1, 900 * mb, RAMP_BUSY - 0.01), None, allowed=8, queued=50) == 1
    assert ramp_step(one, None, allowed=1, queued=50) == -1  # -c 1


def test_a_busy_connection_is_not_doubled(server, tmp_path, monkeypatch):
    """When the measured connection keeps this process on the CPU (as on a fast local
    link), the pool stays at one connection: the default is -c 1 there."""
    from pylmserv.transfer import scheduler

    monkeypatch.setattr(scheduler, "RAMP_BUSY", 0.0)  # any CPU time at all counts as busy
    assert fetch_shaped(server, tmp_path, 8, rate=4 * MB) == 1


def test_stalled_connection_is_restarted(server, data, tmp_path):
    import threading

    url = server.add("f.bin", data)
    # 3 stalls: the 1-byte probe (harmless) and both parts, 100 kB into their bodies.
    server.faults.stall_after, server.faults.stall_times, server.faults.stall_seconds = 100_000, 3, 3.0
    half = -(-len(data) // 2)
    second_part = threading.Event()

    def second_part_first(srv, req):
        """Events, not timing: the first part's retry waits until the second part was asked
        for, so the three stalls are the probe's and each part's first answer."""
        rng = req.headers.get("Range", "")
        if rng.startswith(f"bytes={half}-"):
            second_part.set()
        elif rng.startswith("bytes=100000-"):
            assert second_part.wait(30), "the second part was never asked for"

    server.on_request = second_part_first
    fetch(url, tmp_path, data, connections=2, stall_timeout=0.5, min_part_size=half)  # 2 parts
    assert (tmp_path / "out.bin").read_bytes() == data
    ranges = [q.headers["Range"] for q in server.ranged_requests()]
    # Each stalled part was asked again from exactly where its bytes stopped.
    assert f"bytes=100000-{half - 1}" in ranges
    assert f"bytes={half + 100_000}-{len(data) - 1}" in ranges
    assert server.bytes_sent == len(data) + 1


def test_html_error_page_with_200_is_named_and_deleted(server, data, tmp_path):
    url = server.add("f.bin", data)
    server.faults.html = True
    with pytest.raises(VerificationError) as exc:
        fetch(url, tmp_path, expected=Hash.of_bytes(data))
    assert "HTML page" in exc.value.message and Hash.of_bytes(data).hex in exc.value.message
    assert not (tmp_path / "out.bin").exists() and leftovers(tmp_path) == []


def test_empty_body_names_the_empty_hash(server, data, tmp_path):
    url = server.add("f.bin", data)
    server.faults.empty = True
    with pytest.raises(VerificationError) as exc:
        fetch(url, tmp_path, expected=Hash.of_bytes(data))
    assert EMPTY_SHA256.hex in exc.value.message and "proxy" in exc.value.message


def test_wrong_hash_deletes_data_and_reports_expected_and_got(server, data, tmp_path):
    url = server.add("f.bin", data)
    wrong = Hash.of_bytes(b"something else")
    with pytest.raises(VerificationError) as exc:
        fetch(url, tmp_path, expected=wrong, connections=4)
    msg = exc.value.message
    assert wrong.hex in msg and Hash.of_bytes(data).hex in msg
    assert exc.value.exit_code == 4
    assert not (tmp_path / "out.bin").exists() and leftovers(tmp_path) == []


def test_size_mismatch_is_caught_before_downloading(server, data, tmp_path):
    url = server.add("f.bin", data)
    with pytest.raises(VerificationError, match="expected 123 bytes"):
        fetch(url, tmp_path, size=123)
    assert server.bytes_sent <= 1


def test_5xx_is_retried_and_404_is_a_clear_error(server, data, tmp_path, monkeypatch):
    url = server.add("f.bin", data)
    monkeypatch.setattr(dl, "RETRY_BASE", 0.01)
    server.faults.fail_times = 2
    fetch(url, tmp_path, data)
    assert [q.status for q in server.requests[:2]] == [503, 503]
    assert (tmp_path / "out.bin").read_bytes() == data
    with pytest.raises(NetworkError, match="HTTP 404"):
        fetch(server.url("missing.bin"), tmp_path)


def test_authorization_goes_to_the_origin_host_only(data, tmp_path):
    with fault_server() as hub, fault_server() as cdn:
        cdn.add("f.bin", data)
        hub.redirect_base = cdn.base
        fetch(hub.url("redirect/f.bin"), tmp_path, data, headers={"Authorization": "Bearer SECRET"},
              connections=4)
        assert (tmp_path / "out.bin").read_bytes() == data
        assert hub.requests and all(q.headers.get("Authorization") == "Bearer SECRET" for q in hub.requests)
        assert cdn.requests and not any("Authorization" in q.headers for q in cdn.requests)
        # Parts went straight to the CDN URL found by the probe.
        assert len([q for q in cdn.requests if q.headers.get("Range") != "bytes=0-0"]) == 5


def test_expired_signed_url_is_re_resolved(server, data, tmp_path):
    server.add("f.bin", data)
    server.faults.signed_ttl = 2  # probe + one part per signed URL
    server.faults.cut_at, server.faults.cut_times = 1_000_000, 3
    fetch(server.url("signed/f.bin"), tmp_path, data, connections=1)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert 403 in [q.status for q in server.requests]
    assert len([q for q in server.requests if q.path.startswith("/signed/")]) >= 2


def test_file_url(tmp_path, data):
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    r = download(src.as_uri(), tmp_path / "out.bin", expected=Hash.of_bytes(data), progress=False)
    assert r.size == len(data) and (tmp_path / "out.bin").read_bytes() == data
    with pytest.raises(VerificationError):
        download(src.as_uri(), tmp_path / "bad.bin", expected=EMPTY_SHA256, progress=False)
    assert not (tmp_path / "bad.bin").exists()


def test_free_space_check_with_mocked_disk_usage(server, data, tmp_path, monkeypatch):
    """Mock: a full disk cannot be made here without root; statvfs (what shutil.disk_usage
    reads) reports 1 KiB free to the partial's directory."""
    import os
    from types import SimpleNamespace

    url = server.add("f.bin", data)
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=1, f_frsize=1024))
    with pytest.raises(DiskSpaceError, match="not enough free space"):
        fetch(url, tmp_path, data)
    assert server.bytes_sent <= 1


def test_progress_logs_a_line_when_not_a_terminal(caplog):
    import io
    import logging

    from pylmserv.core.progress import Progress

    caplog.set_level(logging.INFO, logger="pylmserv.progress")
    # Attach directly: an earlier in-process CLI run stops "pylmserv" propagating to root.
    logger = logging.getLogger("pylmserv.progress")
    logger.addHandler(caplog.handler)
    try:
        bar = Progress("m.gguf", 4 * MB, stream=io.StringIO(), interval=0.0)
        bar.update(MB)
        bar.update(MB)
        bar.close()
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == "pylmserv.progress"]
    assert lines and lines[-1].startswith("m.gguf: 2.0/4.0 MiB (50%)")


def test_download_reports_progress_from_all_connections(server, data, tmp_path):
    url = server.add("f.bin", data)
    seen = []
    fetch(url, tmp_path, data, connections=4, on_progress=lambda n, total: seen.append((n, total)))
    assert seen[-1] == (len(data), len(data))
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)


def test_enospc_while_writing_keeps_the_partial_mocked_pwrite(server, data, tmp_path, monkeypatch):
    """Mock: os.pwrite fails with ENOSPC after 3 writes (a full disk cannot be made here)."""
    import errno

    url = server.add("f.bin", data)
    real = os.pwrite
    calls = []

    def pwrite(fd, chunk, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, chunk, offset)

    monkeypatch.setattr(dl.os, "pwrite", pwrite)
    with pytest.raises(DiskSpaceError, match="no space left.*kept for resume"):
        fetch(url, tmp_path, data, connections=2)
    assert any(n.endswith(".state.json") for n in leftovers(tmp_path))
    monkeypatch.setattr(dl.os, "pwrite", real)
    server.reset_counters()
    fetch(url, tmp_path, data, connections=2)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert server.bytes_sent < len(data) + 1  # resumed: what was written is not fetched again


def test_unreachable_server_is_one_clear_line(tmp_path):
    with pytest.raises(NetworkError) as exc:
        fetch("http://127.0.0.1:1/x.bin", tmp_path, expected=EMPTY_SHA256)
    assert exc.value.message == "cannot reach http://127.0.0.1:1/x.bin: [Errno 111] Connection refused"


@pytest.fixture
def small_fs(tmp_path):
    """A real 6 MiB tmpfs (needs mount privileges; skipped where there are none)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True,
                          timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_real_full_disk_refuses_before_downloading(server, small_fs, tmp_path):
    big = os.urandom(8 * MB)
    url = server.add("big.bin", big)
    with pytest.raises(DiskSpaceError, match="not enough free space"):
        download(url, small_fs / "out.bin", expected=Hash.of_bytes(big), tmp_dir=small_fs / "tmp", progress=False)
    assert server.bytes_sent <= 1


def test_real_enospc_mid_download_keeps_the_partial_for_resume(server, data, small_fs, tmp_path):
    """The disk fills up (another writer) after the size check: ENOSPC from the kernel."""
    import threading
    import time

    url = server.add("f.bin", data)
    server.faults.rate = 2 * MB
    filler = small_fs / "filler"

    def fill_up_after_1_5_mb():
        while server.sent_so_far < 1.5 * MB:
            time.sleep(0.01)
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * (64 << 10))
        except OSError:
            pass
        finally:
            os.close(fd)

    threading.Thread(target=fill_up_after_1_5_mb, daemon=True).start()
    with pytest.raises(DiskSpaceError, match="kept for resume"):
        download(url, small_fs / "out.bin", expected=Hash.of_bytes(data), tmp_dir=small_fs / "tmp",
                 connections=2, progress=False)
    kept = [p.name for p in (small_fs / "tmp").iterdir()]
    assert any(n.endswith(".part") for n in kept)
    saved = kept_bytes(small_fs / "tmp")
    assert saved > 0
    filler.unlink()
    server.faults.rate = None
    server.reset_counters()  # once the first run's connections have wound down
    download(url, small_fs / "out.bin", expected=Hash.of_bytes(data), tmp_dir=small_fs / "tmp",
             connections=2, progress=False)
    assert (small_fs / "out.bin").read_bytes() == data
    assert server.bytes_sent == len(data) - saved + 1  # what was saved is not fetched again (+1: the probe)


def test_chunked_body_of_unknown_size(server, data, tmp_path):
    url = server.add("f.bin", data)
    server.faults.chunked = True
    r = fetch(url, tmp_path, expected=Hash.of_bytes(data), connections=8)
    assert r.size == len(data) and (tmp_path / "out.bin").read_bytes() == data
    assert len(server.requests) == 1  # the probe's 200 stream was the download


def test_trailing_hasher_gives_the_file_hash_whatever_it_is_handed(tmp_path):
    """Chunks handed over in order, out of order, twice (a retried range), beyond the
    window, or not at all: the hash is the file's, and the window bounds what is kept."""
    import random
    import threading

    from pylmserv.transfer import hasher as hasher_mod

    data = os.urandom(hasher_mod.WINDOW * 3 + 12345)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    frontier = [0]
    cond = threading.Condition()
    h = hasher_mod.TrailingHasher(fd, lambda: frontier[0], cond)
    h.start()
    rng = random.Random(7)
    chunks = [(o, data[o:o + 100_000]) for o in range(0, len(data), 100_000)]
    try:
        for i, (offset, chunk) in enumerate(chunks):
            if rng.random() < 0.7:
                h.offer(offset, chunk)
            if rng.random() < 0.2 and i + 40 < len(chunks):
                h.offer(*chunks[i + 40])  # far ahead: past the window, not kept
            if rng.random() < 0.1 and i:
                h.offer(*chunks[i - 1])  # a retried range: already hashed or queued
            with h.qlock:  # the hasher thread drops chunks meanwhile
                assert sum(len(c) for c in h.queue.values()) <= hasher_mod.WINDOW
            with cond:
                frontier[0] = offset + len(chunk)
                cond.notify_all()
        h.finish(len(data))
    finally:
        os.close(fd)
    assert h.result() == Hash.of_bytes(data)
