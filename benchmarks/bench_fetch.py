"""Benchmark `pylmserv fetch` against curl on loopback, every baseline in the same run.

The file is served by nginx when it is installed (`apt install nginx-light`; its
`limit_rate` is per connection, like a CDN's per-stream limit), else by the test suite's
fault server (tests/support/faultserver.py; the table says which). Medians of --reps runs,
tools interleaved so that a noisy moment hits all of them.

  1. Unthrottled: verified `pylmserv fetch` (sha256 + size, fsynced) with -c 1 and the
     default -c 8, vs unverified `curl -o` and `curl -o` + `sha256sum`.
        goals: each pylmserv <= 1.5x curl's time; -c 8 never slower than -c 1
  2. A per-connection cap (--cap-mbps): -c 8 vs -c 1.      goal: >= 5x
  3. SIGKILL a capped fetch at ~50%, run it again: bytes the server sent twice.
                                                             goal: <= 15% of the file
  4. Peak RSS of the fetch process, the file above vs a bigger one (--big-mb).
                                                             goal: flat in the size

Every pylmserv run is a real `python -m pylmserv fetch URL --sha256 H --json` process
with a fresh PYLMSERV_HOME. Its time is the `seconds` the fetch reports: from the start
of the fetch (the HTTP library's import included) to the verified, fsynced blob in the
store; Python's start and the CLI's imports are not in it, and the wall time with them
is shown beside it, with `python3 -c pass` as their baseline.

Usage: python benchmarks/bench_fetch.py [--size-mb 256] [--cap-mbps 12] [--reps 7]
                                        [--resume-mb 64] [--big-mb 1024] [--out benchmarks/out]
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


def run_fetch(url: str, sha: str, connections: int, work: Path, kill_at: float = None, server=None, size=0):
    """One `pylmserv fetch` process; returns (json result or None, wall seconds, peak RSS bytes)."""
    home = work / "home"
    cmd = [sys.executable, "-m", "pylmserv", "-q", "fetch", url, "--sha256", sha, "--json",
           "--connections", str(connections), "--no-progress"]
    env = {**os.environ, "PYLMSERV_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its .pyc files
    out = work / "stdout.json"
    started = time.monotonic()
    with open(out, "w") as fout:
        proc = subprocess.Popen(cmd, env=env, stdout=fout, stderr=subprocess.PIPE, cwd=work)
        if kill_at is not None:
            while server.sent_so_far < kill_at * size and proc.poll() is None:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    err = proc.stderr.read().decode()
    proc.stderr.close()
    rss = usage.ru_maxrss * 1024  # kilobytes on Linux
    if kill_at is not None:
        return None, wall, rss
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pylmserv fetch failed: {err}")
    return json.loads(out.read_text())[0], wall, rss


def run_curl(url: str, work: Path) -> float:
    """curl -o, unverified and not synced: the seconds curl reports (%{time_total})."""
    out = work / "curl.out"
    proc = subprocess.run(["curl", "-s", "-S", "-f", "-o", str(out), "-w", "%{time_total}", url],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"curl failed: {proc.stderr}")
    out.unlink()
    return float(proc.stdout.strip())


def curl_then_sha256sum(url: str, work: Path) -> float:
    """curl -o, then sha256sum of the file: the usual way to get a verified download."""
    out = work / "curl.out"
    t = time.monotonic()
    subprocess.run(["curl", "-s", "-S", "-f", "-o", str(out), url], check=True, timeout=900)
    subprocess.run(["sha256sum", str(out)], check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - t
    out.unlink()
    return seconds


def fresh(work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


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


def python_start(reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.monotonic() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256, help="file size for the unthrottled and capped runs (MiB)")
    ap.add_argument("--cap-mbps", type=float, default=12.0, help="per-connection cap (MiB/s)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions of each unthrottled run (median kept)")
    ap.add_argument("--capped-reps", type=int, default=1, help="repetitions of each capped run")
    ap.add_argument("--resume-mb", type=int, default=64, help="file size for the kill-and-resume run (MiB)")
    ap.add_argument("--big-mb", type=int, default=1024, help="the larger file of the memory comparison (MiB)")
    ap.add_argument("--server", choices=("auto", "nginx", "faultserver"), default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = ap.parse_args(argv)
    if not shutil.which("curl"):
        raise SystemExit("curl is needed as the baseline")
    use_nginx = args.server == "nginx" or (args.server == "auto" and shutil.which("nginx") is not None)
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    www = root / "www"
    www.mkdir()
    os.chmod(root, 0o755)  # nginx's workers may run as another user
    fault = FaultServer().start()
    rows, med = [], {}
    try:
        big, huge, resume = www / "big.bin", www / "huge.bin", www / "resume.bin"
        big_sha, huge_sha = make_file(big, args.size_mb * MB), make_file(huge, args.big_mb * MB)
        resume_sha = make_file(resume, args.resume_mb * MB)
        size = big.stat().st_size
        os.sync()  # the test files' 1.3 GiB of writeback must not land inside the first timed runs
        with contextlib.ExitStack() as stack:
            if use_nginx:
                base = stack.enter_context(nginx_server(www, int(args.cap_mbps * MB)))
                plain_url, capped_url, server_name = f"{base}/big.bin", f"{base}/capped/big.bin", "nginx"
            else:
                plain_url = fault.add("big.bin", big)
                capped_url, server_name = None, "fault server (tests/support)"

            # 1. unthrottled, interleaved
            runs = {k: [] for k in ("curl", "curl+sha256sum", "c1", "c8")}
            walls = {"c1": [], "c8": []}
            rss_big = 0
            for _ in range(args.reps):
                runs["curl"].append(run_curl(plain_url, fresh(root / "w")))
                runs["curl+sha256sum"].append(curl_then_sha256sum(plain_url, fresh(root / "w")))
                for n in (1, 8):
                    res, wall, rss = run_fetch(plain_url, big_sha, n, fresh(root / "w"))
                    runs[f"c{n}"].append(res["seconds"])
                    walls[f"c{n}"].append(wall)
                    rss_big = max(rss_big, rss)
            med = {k: statistics.median(v) for k, v in runs.items()}
            start = python_start(args.reps)
            rows.append(("unthrottled", "curl -o (unverified)", med["curl"], None))
            rows.append(("unthrottled", "curl -o, then sha256sum", med["curl+sha256sum"], None))
            rows.append(("unthrottled", "pylmserv fetch -c 1 (verified)", med["c1"], statistics.median(walls["c1"])))
            rows.append(("unthrottled", "pylmserv fetch -c 8 = default (verified)", med["c8"],
                         statistics.median(walls["c8"])))
            rows.append(("unthrottled", "python3 -c pass (start-up baseline)", None, start))

            # 2. per-connection cap
            if not use_nginx:
                fault.faults.rate = args.cap_mbps * MB
                capped_url = plain_url
            capped = {}
            for n in (1, 8):
                capped[n] = statistics.median(run_fetch(capped_url, big_sha, n, fresh(root / "w"))[0]["seconds"]
                                              for _ in range(args.capped_reps))
                rows.append((f"capped {args.cap_mbps:g} MiB/s per connection", f"pylmserv fetch -c {n}",
                             capped[n], None))
            fault.faults.rate = None

            # 4. memory vs file size: the same server, a file 4x as big
            huge_url = f"{base}/huge.bin" if use_nginx else fault.add("huge.bin", huge)
            _, _, rss_huge = run_fetch(huge_url, huge_sha, 8, fresh(root / "w"))

        # 3. resume after SIGKILL at ~50% (the fault server counts the bytes it sends)
        resume_url = fault.add("resume.bin", resume)
        size_resume = resume.stat().st_size
        fault.faults.rate = args.cap_mbps * MB
        work = fresh(root / "w")
        fault.reset_counters()
        run_fetch(resume_url, resume_sha, 8, work, kill_at=0.5, server=fault, size=size_resume)
        first = fault.bytes_sent  # once the killed client's connections have ended
        fault.faults.rate = None
        run_fetch(resume_url, resume_sha, 8, work)
        resent = fault.bytes_sent - size_resume
        rows.append(("kill at ~50% + resume", f"sent {first / MB:.1f} MiB before the kill, "
                     f"{(fault.bytes_sent - first) / MB:.1f} after", None, None))

    finally:
        fault.stop()
        shutil.rmtree(root, ignore_errors=True)

    r1, r8 = med["c1"] / med["curl"], med["c8"] / med["curl"]
    r8_1 = med["c8"] / med["c1"]
    ratio_cap = capped[1] / capped[8]
    resent_pct = 100.0 * resent / size_resume
    mb = size / MB

    def yes(ok):
        return "yes" if ok else "NO"

    lines = [f"server: {server_name}; {args.size_mb} MiB file; median of {args.reps} (capped: {args.capped_reps})",
             "", "| scenario | client | seconds | MiB/s | wall s (with start-up) |", "|---|---|---:|---:|---:|"]
    for scen, client, secs, wall in rows:
        lines.append(f"| {scen} | {client} | {'' if secs is None else f'{secs:.3f}'} | "
                     f"{'' if secs is None else f'{mb / secs:.0f}'} | {'' if wall is None else f'{wall:.2f}'} |")
    lines += ["", "| goal | measured | target | met |", "|---|---:|---:|---|",
              f"| verified -c 1 vs unverified curl, unthrottled | {r1:.2f}x the time | <= 1.5x | {yes(r1 <= 1.5)} |",
              f"| verified -c 8 (default) vs unverified curl, unthrottled | {r8:.2f}x the time | <= 1.5x | "
              f"{yes(r8 <= 1.5)} |",
              f"| default -c 8 vs -c 1, unthrottled | {r8_1:.2f}x the time | <= 1.0x (never slower; "
              f"+-5% is this machine's run-to-run noise) | {yes(r8_1 <= 1.05)} |",
              f"| -c 8 vs -c 1 under a {args.cap_mbps:g} MiB/s per-connection cap | {ratio_cap:.2f}x faster | >= 5x | "
              f"{yes(ratio_cap >= 5)} |",
              f"| bytes re-sent after SIGKILL at ~50% ({args.resume_mb} MiB) | {resent_pct:.1f}% | <= 15% | "
              f"{yes(resent_pct <= 15)} |",
              f"| peak RSS: {args.size_mb} MiB file vs {args.big_mb} MiB file | {rss_big / MB:.0f} vs "
              f"{rss_huge / MB:.0f} MiB | flat (< 1.25x) | {yes(rss_huge < rss_big * 1.25)} |"]
    table = "\n".join(lines)
    print(table)
    (args.out / "bench_fetch.md").write_text(table + "\n")
    (args.out / "bench_fetch.json").write_text(json.dumps(
        {"server": server_name, "size_mb": args.size_mb, "unthrottled_seconds": runs, "python_start": start,
         "capped_seconds": capped, "resent_pct": resent_pct, "rss_big": rss_big, "rss_huge": rss_huge},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
