"""Where one verified download's time goes, inside the process (no start-up): when the
bytes are received and hashed, how long the download then waits for the hasher, and how
long for the final fsync that makes the blob durable. The same 256 MiB file from nginx
on loopback as bench_fetch.py, -c 1 and the default 8, a `sync` before each run.

The waits are timed by wrapping `os.fsync` and `TrailingHasher.finish` in this process
(a measurement: nothing in pylmserv changes). The `dd conv=fdatasync` row is the disk's
floor measured in the same run: the same bytes made durable from memory, no network.

Usage: python benchmarks/bench_fetch_phases.py [--size-mb 256] [--reps 3]
(run it in the clean venv `python3 benchmarks/clean_venv.py DIR` makes, as bench_fetch.py)."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_fetch  # noqa: E402  (nginx_server, make_file: one owner of the setup)
from pylmserv.core.hashing import Hash  # noqa: E402
from pylmserv.transfer import download as dl  # noqa: E402
from pylmserv.transfer import hasher  # noqa: E402

MB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-phases-"))
    marks = []

    def timed_call(label, fn):
        def wrapper(*a, **kw):
            t = time.monotonic()
            try:
                return fn(*a, **kw)
            finally:
                marks.append((label, t, time.monotonic()))
        return wrapper

    real_fsync, real_finish = os.fsync, hasher.TrailingHasher.finish
    try:
        os.chmod(root, 0o755)  # nginx's workers read the file as another user
        (root / "www").mkdir()
        sha = bench_fetch.make_file(root / "www" / "m.bin", args.size_mb * MB)
        rows = []
        with bench_fetch.nginx_server(root / "www", 12 * MB) as base:
            for rep in range(args.reps):
                for connections in (1, 8):
                    out = root / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    os.sync()
                    marks.clear()
                    os.fsync = timed_call("fsync", real_fsync)
                    hasher.TrailingHasher.finish = timed_call("hasher", real_finish)
                    t0 = time.monotonic()
                    dl.download(f"{base}/m.bin", out / "m.bin", expected=Hash("sha256", bytes.fromhex(sha)),
                                size=args.size_mb * MB, connections=connections, progress=False,
                                tmp_dir=out / "tmp")
                    total = time.monotonic() - t0
                    os.fsync, hasher.TrailingHasher.finish = real_fsync, real_finish
                    waits = {label: sum(b - a for lab, a, b in marks if lab == label) for label in ("hasher", "fsync")}
                    received = min((a for lab, a, _ in marks if lab == "hasher"), default=t0 + total) - t0
                    rows.append((connections, received, waits["hasher"], waits["fsync"], total))
                shutil.rmtree(root / "out", ignore_errors=True)
                os.sync()
                t = time.monotonic()
                subprocess.run(["dd", "if=/dev/zero", f"of={root / 'dd.bin'}", "bs=1M", f"count={args.size_mb}",
                                "conv=fdatasync", "status=none"], check=True)
                rows.append(("dd", None, None, None, time.monotonic() - t))
                os.unlink(root / "dd.bin")
    finally:
        os.fsync, hasher.TrailingHasher.finish = real_fsync, real_finish
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.size_mb} MiB from nginx on loopback, in one process (no start-up); medians of {args.reps}\n")
    print("| run | received and hashed s | then waited for the hasher s | then for the fsync s | durable s |")
    print("|---|---:|---:|---:|---:|")
    for key, name in ((1, "download() -c 1"), (8, "download() -c 8 (the default)")):
        mine = [r for r in rows if r[0] == key]
        med = [statistics.median(col) for col in list(zip(*mine))[1:]]
        print(f"| {name} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} | {med[3]:.3f} |")
    dd = statistics.median(r[4] for r in rows if r[0] == "dd")
    print(f"| dd if=/dev/zero bs=1M conv=fdatasync (no network: the disk's floor) | | | | {dd:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
