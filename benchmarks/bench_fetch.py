"""Benchmark `pylmserv fetch` against `curl -o` on a loopback server, in one run.

  1. Per-connection cap (a CDN's per-stream limit): pylmserv with 1, 2, 4, 8 connections
     vs curl's single stream.                         goal: 8 connections >= 5x one
  2. Unthrottled: verified pylmserv fetch (sha256 + size) vs unverified curl.
                                                      goal: >= 0.8x curl's throughput
  3. SIGKILL a throttled fetch at ~50%, run it again; bytes the server sent twice.
                                                      goal: <= 15% of the file
  4. Peak RSS of the fetch process for two file sizes (memory must not grow with size).

Every pylmserv run is a real `python -m pylmserv fetch URL --sha256 H --json` process
with a fresh PYLMSERV_HOME; its throughput uses the `seconds` it reports (time inside
fetch, excluding interpreter start-up; the wall time including start-up is shown too).
The server is tests/support/faultserver.py (sendfile when unthrottled).

Usage: python benchmarks/bench_fetch.py [--capped-mb 64] [--cap-mbps 4] [--big-mb 1024]
                                        [--out benchmarks/out]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.faultserver import FaultServer  # noqa: E402

MB = 1 << 20


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
    out = work / "stdout.json"
    started = time.monotonic()
    with open(out, "w") as fout:
        proc = subprocess.Popen(cmd, env=env, stdout=fout, stderr=subprocess.PIPE, cwd=work)
        if kill_at is not None:
            while server.bytes_sent < kill_at * size and proc.poll() is None:
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


def run_curl(url: str, work: Path, sync: bool = False):
    """curl -o; with sync, the seconds include an fsync of the file (what pylmserv does
    before installing a blob, so a crash can never leave a trusted blob half on disk)."""
    out = work / "curl.out"
    started = time.monotonic()
    proc = subprocess.run(["curl", "-s", "-S", "-f", "-o", str(out), "-w", "%{time_total}", url],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"curl failed: {proc.stderr}")
    seconds = float(proc.stdout.strip())
    if sync:
        t = time.monotonic()
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        seconds += time.monotonic() - t
    wall = time.monotonic() - started
    size = out.stat().st_size
    out.unlink()
    return size, seconds, wall


def fresh(work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capped-mb", type=int, default=64, help="file size for the capped runs (MiB)")
    ap.add_argument("--cap-mbps", type=float, default=4.0, help="per-connection cap (MiB/s)")
    ap.add_argument("--big-mb", type=int, default=1024, help="file size for the unthrottled runs (MiB)")
    ap.add_argument("--reps", type=int, default=5, help="unthrottled repetitions (best is kept)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = ap.parse_args(argv)
    if not shutil.which("curl"):
        raise SystemExit("curl is needed as the baseline")
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    server = FaultServer().start()
    rows = []
    try:
        small, big = root / "capped.bin", root / "big.bin"
        small_sha = make_file(small, args.capped_mb * MB)
        big_sha = make_file(big, args.big_mb * MB)
        small_url, big_url = server.add("capped.bin", small), server.add("big.bin", big)
        size_small, size_big = small.stat().st_size, big.stat().st_size

        # 1. per-connection cap
        server.faults.rate = args.cap_mbps * MB
        capped = {}
        for n in (1, 2, 4, 8):
            res, wall, rss = run_fetch(small_url, small_sha, n, fresh(root / "w"))
            capped[n] = size_small / res["seconds"] / MB
            rows.append((f"capped {args.cap_mbps:g} MiB/s/conn", f"pylmserv -c {n}", capped[n], wall, rss))
        size, secs, wall = run_curl(small_url, fresh(root / "w"))
        curl_capped = size / secs / MB
        rows.append((f"capped {args.cap_mbps:g} MiB/s/conn", "curl -o (1 stream)", curl_capped, wall, None))

        # 2. unthrottled, verified vs unverified
        server.faults.rate = None
        best_py, best_py1, best_curl, best_curl_sync = 0.0, 0.0, 0.0, 0.0
        rss_big = 0
        for _ in range(args.reps):
            size, secs, _ = run_curl(big_url, fresh(root / "w"))
            best_curl = max(best_curl, size / secs / MB)
            size, secs, _ = run_curl(big_url, fresh(root / "w"), sync=True)
            best_curl_sync = max(best_curl_sync, size / secs / MB)
            res, wall, rss = run_fetch(big_url, big_sha, 8, fresh(root / "w"))
            best_py = max(best_py, size_big / res["seconds"] / MB)
            rss_big = max(rss_big, rss)
            res, wall1, _ = run_fetch(big_url, big_sha, 1, fresh(root / "w"))
            best_py1 = max(best_py1, size_big / res["seconds"] / MB)
        rows.append(("unthrottled", "curl -o (unverified)", best_curl, None, None))
        rows.append(("unthrottled", "curl -o + fsync (unverified)", best_curl_sync, None, None))
        rows.append(("unthrottled", "pylmserv -c 8 (verified)", best_py, None, rss_big))
        rows.append(("unthrottled", "pylmserv -c 1 (verified)", best_py1, None, None))

        # 3. resume after SIGKILL at ~50%
        server.faults.rate = args.cap_mbps * MB
        work = fresh(root / "w")
        server.reset_counters()
        run_fetch(small_url, small_sha, 8, work, kill_at=0.5, server=server, size=size_small)
        time.sleep(0.5)
        first = server.bytes_sent
        server.faults.rate = None
        res, wall, _ = run_fetch(small_url, small_sha, 8, work)
        total = server.bytes_sent
        resent = total - size_small
        rows.append(("kill at 50% + resume", f"sent {first / MB:.1f} MiB before the kill, "
                     f"{(total - first) / MB:.1f} after", None, None, None))

        # 4. memory vs file size (capped file vs big file, both -c 8)
        res, wall, rss_small = run_fetch(small_url, small_sha, 8, fresh(root / "w"))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    ratio_cap = capped[8] / capped[1]
    ratio_curl = best_py / best_curl
    resent_pct = 100.0 * resent / size_small
    lines = ["| scenario | client | MiB/s | wall s | peak RSS MiB |", "|---|---|---:|---:|---:|"]
    for scen, client, mbps, wall, rss in rows:
        lines.append(f"| {scen} | {client} | {'' if mbps is None else f'{mbps:.1f}'} | "
                     f"{'' if wall is None else f'{wall:.2f}'} | {'' if rss is None else f'{rss / MB:.0f}'} |")
    lines += ["", "| goal | measured | target | met |", "|---|---:|---:|---|",
              f"| 8 conns vs 1 conn under a {args.cap_mbps:g} MiB/s/conn cap | {ratio_cap:.2f}x | >= 5x | "
              f"{'yes' if ratio_cap >= 5 else 'NO'} |",
              f"| verified -c 8 vs curl unthrottled ({args.big_mb} MiB) | {ratio_curl:.2f}x | >= 0.8x | "
              f"{'yes' if ratio_curl >= 0.8 else 'NO'} |",
              f"| verified -c 8 vs curl + fsync unthrottled | {best_py / best_curl_sync:.2f}x | (reference) | |",
              f"| bytes re-sent after SIGKILL at ~50% ({args.capped_mb} MiB) | {resent_pct:.1f}% | <= 15% | "
              f"{'yes' if resent_pct <= 15 else 'NO'} |",
              f"| peak RSS: {args.capped_mb} MiB file vs {args.big_mb} MiB file | {rss_small / MB:.0f} vs "
              f"{rss_big / MB:.0f} MiB | flat | {'yes' if rss_big < rss_small * 1.5 else 'NO'} |"]
    table = "\n".join(lines)
    print(table)
    (args.out / "bench_fetch.md").write_text(table + "\n")
    (args.out / "bench_fetch.json").write_text(json.dumps(
        {"capped_mibps": capped, "curl_capped_mibps": curl_capped, "unthrottled": {
            "curl": best_curl, "curl_fsync": best_curl_sync, "pylmserv_c8": best_py, "pylmserv_c1": best_py1},
         "resent_pct": resent_pct, "rss_small": rss_small, "rss_big": rss_big}, indent=1) + "\n")
    plot(capped, curl_capped, args, args.out / "bench_fetch.png")
    return 0


def plot(capped: dict, curl_capped: float, args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[bench]'): no PNG written", file=sys.stderr)
        return
    conns = sorted(capped)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(conns, [capped[n] for n in conns], "o-", label="pylmserv fetch (verified)")
    ax.plot(conns, [args.cap_mbps * n for n in conns], ":", color="gray", label="cap x connections")
    ax.axhline(curl_capped, color="tab:red", linestyle="--", label="curl -o (one stream)")
    ax.set_xlabel("connections")
    ax.set_ylabel("MiB/s")
    ax.set_xticks(conns)
    ax.set_title(f"{args.capped_mb} MiB over loopback, {args.cap_mbps:g} MiB/s per connection")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
