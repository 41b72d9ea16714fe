"""Benchmark `pylmserv pack` against `cp` of the same model (goal: pack <= 1.2x cp).

Packs a model of --size GiB (default 2; random bytes, not sparse) into a small APE/zip
stand-in, and copies the same model with coreutils `cp`, alternating runs so both see the
same page-cache state. Each pack runs in its own process so its peak RSS is measured
(constant memory: it must not grow with the model). Prints a table:

    python3 benchmarks/bench_pack.py [--size 2] [--runs 3] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Peak memory from VmHWM (this process's own high-water mark; ru_maxrss would also count
# the benchmark process it was forked from).
PACK_CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from pylmserv.app.pack import pack
t = time.perf_counter()
pack({model!r}, {lf!r}, {out!r}, verify={verify!r})
secs = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(secs, hwm)
"""


def make_inputs(work: Path, size_gib: float):
    model = work / "model.gguf"
    block = os.urandom(64 << 20)
    total = int(size_gib * (1 << 30))
    with open(model, "wb") as f:
        f.write(b"GGUF")
        written = 4
        while written < total:
            n = min(len(block), total - written)
            f.write(block[:n])
            written += n
    lf = work / "llamafile"
    with open(lf, "wb") as f:
        f.write(b"MZqFpD='\n\n'\necho stand-in\n" + os.urandom(3 << 20))  # a few MiB of "executable"
    with zipfile.ZipFile(lf, "a") as z:
        z.writestr("llamafile/version.txt", "0.8.4\n")
    return model, lf


def time_cp(model: Path, dest: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", str(model), str(dest)], check=True)
    with open(dest, "rb+") as f:  # same durability as pack (which fsyncs)
        os.fsync(f.fileno())
    return time.perf_counter() - t


def time_pack(model: Path, lf: Path, out: Path, verify: bool):
    code = PACK_CHILD.format(repo=str(REPO), model=str(model), lf=str(lf), out=str(out), verify=verify)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    secs, rss_kib = proc.stdout.split()
    return float(secs), int(rss_kib) / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=2.0, help="model size in GiB (default 2)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work directory (same filesystem for all outputs)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-pack.", dir=args.dir))
    try:
        print(f"preparing a {args.size:g} GiB model in {work} ...", file=sys.stderr)
        model, lf = make_inputs(work, args.size)
        modes = {"pack --verify sample": "sample", "pack --verify full": "full", "pack --verify none": "none"}
        rows = {"cp": [], **{label: [] for label in modes}}
        rss = {label: [] for label in modes}
        time_cp(model, work / "warmup")  # fill the page cache once
        os.unlink(work / "warmup")
        for i in range(args.runs):
            dest = work / "copy"
            rows["cp"].append(time_cp(model, dest))
            os.unlink(dest)
            for label, verify in modes.items():
                out = work / "packed"
                secs, peak = time_pack(model, lf, out, verify)
                rows[label].append(secs)
                rss[label].append(peak)
                os.unlink(out)
        base = statistics.median(rows["cp"])
        base_min = min(rows["cp"])
        size_mib = model.stat().st_size / 2**20
        print(f"\nmodel {size_mib:.0f} MiB, {args.runs} runs each, median; machine: {os.cpu_count()} CPUs\n")
        print(f"{'method':<22} {'median s':>9} {'min s':>7} {'MiB/s':>8} {'vs cp':>7} {'min vs cp min':>14} {'peak RSS MiB':>13}")
        for label, times in rows.items():
            med = statistics.median(times)
            peak = f"{max(rss[label]):.0f}" if label in rss else "-"
            print(f"{label:<22} {med:>9.2f} {min(times):>7.2f} {size_mib / med:>8.0f} {med / base:>6.2f}x "
                  f"{min(times) / base_min:>13.2f}x {peak:>13}")
        ratio = statistics.median(rows["pack --verify sample"]) / base
        best = min(rows["pack --verify sample"]) / base_min
        print(f"\ngoal pack <= 1.2x cp: {'met' if ratio <= 1.2 else 'NOT met'} (default, --verify sample: median "
              f"{ratio:.2f}x, best-of-{args.runs} {best:.2f}x; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
