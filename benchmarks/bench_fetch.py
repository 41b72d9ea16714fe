"""Benchmark `pylmserv fetch` against curl and aria2c on loopback, every baseline in the same run.

Whole processes, wall clock, as a user waits for them: each client is a fresh process
(`python -m pylmserv fetch` included: Python's start and the imports count), timed from
its start to its exit. Clients are interleaved, and the order rotates from one
repetition to the next, so a noisy moment of a shared machine hits all of them; every
figure is a median. Before each timed run the previous run's output is deleted and the
machine's dirty pages are written back (`sync`), so no run pays for another's writeback.
Every client writes to the same file system (the run's work directory).

The file is served by nginx (`apt install nginx-light`: `sendfile`, and `limit_rate`,
which is per connection like a CDN's per-stream limit), else by the test suite's fault
server (tests/support/faultserver.py; the table says which; no capped aria2c row then).

  1. Unthrottled: verified `pylmserv fetch` (sha256 + size, fsynced blob) with -c 1 and
     the default (no -c), vs unverified `curl -o FILE` (the baseline of the goals), curl
     to /dev/null and curl + `sync FILE` (where the time goes, see docs/fetch.md), curl +
     sha256sum, and `aria2c --checksum=sha-256=...` with -x1 and -x8; for reference,
     `python3 -c pass` and `python3 -c 'import requests'` (pylmserv's fixed start-up cost)
     and `dd if=/dev/zero conv=fdatasync` of the same size (no network: the time this disk
     takes to make the bytes durable, below which no fsyncing client can finish).
        goals: -c 1 and the default each <= 1.5x curl -o; the default <= -c 1;
               -c 1 ahead of aria2c -x1, the default ahead of aria2c -x8
  2. A per-connection cap (--cap-mbps): the default vs -c 1 (>= 5x) and vs aria2c -x8
     (ahead).
  3. SIGKILL a capped fetch at ~50%, run it again: bytes the server sent twice (<= 15%).
  4. Peak RSS of the fetch process, the file above vs a bigger one (--big-mb; flat).

Usage: python benchmarks/bench_fetch.py [--size-mb 256] [--cap-mbps 12] [--reps 7]
                                        [--capped-reps 3] [--resume-mb 64] [--big-mb 1024]
                                        [--out benchmarks/out]

Run it with the Python an installed pylmserv runs under: a clean venv
(`python3 benchmarks/clean_venv.py DIR`, then `DIR/bin/python benchmarks/bench_fetch.py`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.faultserver import FaultServer  # noqa: E402

MB = 1 << 20
NGINX_CONF = """worker_processes 2;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  server {{
    listen 127.0.0.1:{port};
    root {www};
    location /capped/ {{ alias {www}/; limit_rate {cap}; }}
  }}
}}
"""


def make_file(path: Path, size: int) -> str:
    import hashlib

    h = hashlib.sha256()
    block = os.urandom(4 * MB)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = block[: min(len(block), left)]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def pylmserv_cmd(url: str, sha: str, connections) -> list:
    cmd = [sys.executable, "-m", "pylmserv", "-q", "fetch", url, "--sha256", sha, "--json", "--no-progress"]
    return cmd + (["--connections", str(connections)] if connections else [])


def pylmserv_env(work: Path) -> dict:
    env = {**os.environ, "PYLMSERV_HOME": str(work / "home"), "PYTHONPATH": str(REPO)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its .pyc files
    return env


DD_FLOOR = "dd conv=fdatasync (no network: the disk's floor)"


def clients(url: str, sha: str, work: Path, size_mb: int) -> dict:
    """name -> argv of one whole process, all writing under `work`."""
    out = str(work / "out.bin")
    aria = ["aria2c", "-q", "--allow-overwrite=true", "--auto-file-renaming=false", "--file-allocation=none",
            f"--checksum=sha-256={sha}", "-d", str(work), "-o", "aria.bin"]
    return {
        "curl -o FILE (unverified)": ["curl", "-sSf", "-o", out, url],
        "curl -o /dev/null": ["curl", "-sSf", "-o", "/dev/null", url],
        "curl -o FILE && sync FILE": ["sh", "-c", 'curl -sSf -o "$1" "$2" && sync "$1"', "sh", out, url],
        "curl -o FILE && sha256sum FILE": ["sh", "-c", 'curl -sSf -o "$1" "$2" && sha256sum "$1" >/dev/null',
                                           "sh", out, url],
        # the same bytes made durable from memory: no client that fsyncs can finish sooner
        DD_FLOOR: ["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={size_mb}", "conv=fdatasync", "status=none"],
        "pylmserv fetch -c 1": pylmserv_cmd(url, sha, 1),
        "pylmserv fetch (default)": pylmserv_cmd(url, sha, None),
        "aria2c -x1 --checksum": aria + ["-x1", "-s1", url],
        "aria2c -x8 -s8 --checksum": aria + ["-x8", "-s8", "-k1M", url],
        # where pylmserv's fixed cost goes (no download): the interpreter's start, and with
        # the HTTP library's import (requests, urllib3, charset_normalizer, idna, ...)
        "python3 -c pass (start-up only)": [sys.executable, "-c", "pass"],
        "python3 -c 'import requests' (start-up only)": [sys.executable, "-c", "import requests"],
    }


def fresh(work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.sync()  # the last run's dirty pages are written back now, outside any timing
    return work


def timed(cmd: list, work: Path) -> float:
    env = pylmserv_env(work) if cmd[0] == sys.executable else None
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.decode()[-2000:]}")
    return wall


def interleaved(names: list, cmds: dict, reps: int, work: Path) -> dict:
    """Median wall seconds per client; each repetition starts one client later."""
    times = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            times[name].append(timed(cmds[name], fresh(work)))
    return times


def run_fetch(url: str, sha: str, connections, work: Path, kill_at: float = None, server=None, size=0):
    """One `pylmserv fetch` process; returns (wall seconds, peak RSS bytes)."""
    started = time.monotonic()
    proc = subprocess.Popen(pylmserv_cmd(url, sha, connections), env=pylmserv_env(work), cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_at is not None:
        while server.sent_so_far < kill_at * size and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if kill_at is None and os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pylmserv fetch failed: {err}")
    return wall, usage.ru_maxrss * 1024  # kilobytes on Linux


@contextlib.contextmanager
def nginx_server(www: Path, cap_bytes: int):
    """nginx serving `www` at / and, capped per connection, at /capped/; yields the base URL."""
    root = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / "nginx.conf").write_text(NGINX_CONF.format(root=root, port=port, www=www, cap=cap_bytes))
    proc = subprocess.Popen(["nginx", "-c", str(root / "nginx.conf"), "-p", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            if proc.poll() is not None:
                raise SystemExit(f"nginx did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256, help="file size for the unthrottled and capped runs (MiB)")
    ap.add_argument("--cap-mbps", type=float, default=12.0, help="per-connection cap (MiB/s)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions of each unthrottled client (median kept)")
    ap.add_argument("--capped-reps", type=int, default=3, help="repetitions of each capped client")
    ap.add_argument("--resume-mb", type=int, default=64, help="file size for the kill-and-resume run (MiB)")
    ap.add_argument("--big-mb", type=int, default=1024, help="the larger file of the memory comparison (MiB)")
    ap.add_argument("--server", choices=("auto", "nginx", "faultserver"), default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = ap.parse_args(argv)
    for tool in ("curl", "aria2c", "sha256sum"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed as a baseline (scripts/setup-dev.sh installs it)")
    use_nginx = args.server == "nginx" or (args.server == "auto" and shutil.which("nginx") is not None)
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-fetch-", dir=os.environ.get("BENCH_DIR")))
    www, work = root / "www", root / "w"
    www.mkdir()
    os.chmod(root, 0o755)  # nginx's workers may run as another user
    fault = FaultServer().start()
    load_before = os.getloadavg()
    try:
        big, huge, resume = www / "big.bin", www / "huge.bin", www / "resume.bin"
        big_sha = make_file(big, args.size_mb * MB)
        huge_sha = make_file(huge, args.big_mb * MB) if args.big_mb else None
        resume_sha = make_file(resume, args.resume_mb * MB)
        with contextlib.ExitStack() as stack:
            if use_nginx:
                base = stack.enter_context(nginx_server(www, int(args.cap_mbps * MB)))
                plain_url, capped_url, server_name = f"{base}/big.bin", f"{base}/capped/big.bin", "nginx"
            else:
                plain_url = fault.add("big.bin", big)
                capped_url, server_name = plain_url, "fault server (tests/support)"

            # 1. unthrottled, interleaved
            cmds = clients(plain_url, big_sha, work, args.size_mb)
            plain = interleaved(list(cmds), cmds, args.reps, work)

            # 2. per-connection cap
            if not use_nginx:
                fault.faults.rate = args.cap_mbps * MB
            capped_cmds = clients(capped_url, big_sha, work, args.size_mb)
            names = ["pylmserv fetch (default)", "pylmserv fetch -c 1"] + (["aria2c -x8 -s8 --checksum"] if use_nginx else [])
            capped = interleaved(names[:1] + names[2:], capped_cmds, args.capped_reps, work)
            capped.update(interleaved(names[1:2], capped_cmds, 1, work))  # 20 s a run: once
            fault.faults.rate = None

            # 4. memory vs file size: the same server, a file 4x as big
            _, rss_big = run_fetch(plain_url, big_sha, None, fresh(work))
            rss_huge = None
            if huge_sha:
                huge_url = f"{base}/huge.bin" if use_nginx else fault.add("huge.bin", huge)
                _, rss_huge = run_fetch(huge_url, huge_sha, None, fresh(work))

        # 3. resume after SIGKILL at ~50% (the fault server counts the bytes it sends)
        resume_url = fault.add("resume.bin", resume)
        size_resume = resume.stat().st_size
        fault.faults.rate = args.cap_mbps * MB
        fresh(work)
        fault.reset_counters()
        run_fetch(resume_url, resume_sha, None, work, kill_at=0.5, server=fault, size=size_resume)
        first = fault.bytes_sent  # once the killed client's connections have ended
        fault.faults.rate = None
        run_fetch(resume_url, resume_sha, None, work)
        resent = fault.bytes_sent - size_resume
    finally:
        fault.stop()
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    med = {k: statistics.median(v) for k, v in plain.items()}
    cmed = {k: statistics.median(v) for k, v in capped.items()}
    curl, c1, dflt = med["curl -o FILE (unverified)"], med["pylmserv fetch -c 1"], med["pylmserv fetch (default)"]
    mb = args.size_mb

    def yes(ok):
        return "yes" if ok else "NO"

    lines = [f"server: {server_name}; {mb} MiB file; whole processes, wall clock; medians of {args.reps} "
             f"(capped: {args.capped_reps}, -c 1 capped: 1), clients interleaved; "
             f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after ({os.cpu_count()} CPUs)",
             "", "| scenario | client | wall s (median) | min-max s | MiB/s | vs curl -o FILE |",
             "|---|---|---:|---:|---:|---:|"]
    for name, ts in plain.items():
        rate = "" if "start-up only" in name else f"{mb / med[name]:.0f}"
        lines.append(f"| unthrottled | {name} | {med[name]:.3f} | {min(ts):.2f}-{max(ts):.2f} | "
                     f"{rate} | {med[name] / curl:.2f}x |")
    for name, ts in capped.items():
        lines.append(f"| capped {args.cap_mbps:g} MiB/s per connection | {name} | {cmed[name]:.3f} | "
                     f"{min(ts):.2f}-{max(ts):.2f} | {mb / cmed[name]:.0f} | |")
    resent_pct = 100.0 * resent / size_resume
    lines.append(f"| kill at ~50% + resume | sent {first / MB:.1f} MiB before the kill, "
                 f"{(fault.bytes_sent - first) / MB:.1f} after | | | | |")
    a1, a8 = med["aria2c -x1 --checksum"], med["aria2c -x8 -s8 --checksum"]
    cap_d, cap_1 = cmed["pylmserv fetch (default)"], cmed["pylmserv fetch -c 1"]
    lines += ["", "| goal | measured | target | met |", "|---|---:|---:|---|",
              f"| verified -c 1 vs unverified curl -o FILE | {c1 / curl:.2f}x the time | <= 1.5x | {yes(c1 <= 1.5 * curl)} |",
              f"| verified default vs unverified curl -o FILE | {dflt / curl:.2f}x the time | <= 1.5x | "
              f"{yes(dflt <= 1.5 * curl)} |",
              f"| (the floor of a durable write: {DD_FLOOR} vs curl -o FILE) | {med[DD_FLOOR] / curl:.2f}x the time | | |",
              f"| default vs -c 1, unthrottled | {dflt / c1:.2f}x the time | <= 1.0x | {yes(dflt <= c1)} |",
              f"| -c 1 vs aria2c -x1 --checksum, unthrottled | {c1 / a1:.2f}x the time | < 1.0x | {yes(c1 < a1)} |",
              f"| default vs aria2c -x8 --checksum, unthrottled | {dflt / a8:.2f}x the time | < 1.0x | "
              f"{yes(dflt < a8)} |",
              f"| default vs -c 1 under a {args.cap_mbps:g} MiB/s per-connection cap | {cap_1 / cap_d:.2f}x faster | "
              f">= 5x | {yes(cap_1 >= 5 * cap_d)} |"]
    if "aria2c -x8 -s8 --checksum" in cmed:
        ca8 = cmed["aria2c -x8 -s8 --checksum"]
        lines.append(f"| default vs aria2c -x8 --checksum under the cap | {cap_d / ca8:.2f}x the time | < 1.0x | "
                     f"{yes(cap_d < ca8)} |")
    lines.append(f"| bytes re-sent after SIGKILL at ~50% ({args.resume_mb} MiB) | {resent_pct:.1f}% | <= 15% | "
                 f"{yes(resent_pct <= 15)} |")
    if rss_huge is not None:
        lines.append(f"| peak RSS: {mb} MiB file vs {args.big_mb} MiB file | {rss_big / MB:.0f} vs "
                     f"{rss_huge / MB:.0f} MiB | flat (< 1.25x) | {yes(rss_huge < rss_big * 1.25)} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "bench_fetch.md").write_text(table + "\n")
    (args.out / "bench_fetch.json").write_text(json.dumps(
        {"server": server_name, "size_mb": mb, "unthrottled_wall": plain, "capped_wall": capped,
         "resent_pct": resent_pct, "rss_big": rss_big, "rss_huge": rss_huge,
         "loadavg": [load_before, load_after]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
