"""Start-up cost of the CLI: `pylmserv --help` (and `--version`) vs `python3 -c pass`.

The goal (issue 2): `pylmserv --help` under 200 ms on top of Python's own start, which
holds only while subcommands and heavy libraries (requests, tqdm) are imported lazily.

    python3 benchmarks/bench_cli_start.py [--repeat 15]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = [
    ("python3 -c pass (baseline)", [sys.executable, "-c", "pass"]),
    ("pylmserv --help", [sys.executable, "-m", "pylmserv", "--help"]),
    ("pylmserv --version", [sys.executable, "-m", "pylmserv", "--version"]),
    ("pylmserv prefetch --help", [sys.executable, "-m", "pylmserv", "prefetch", "--help"]),
]
HEAVY = ("requests", "tqdm", "urllib3", "zstandard", "hypothesis")


def timed(cmd, repeat):
    subprocess.run(cmd, capture_output=True, check=True)  # warm the page cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def heavy_imports() -> list:
    """Top-level packages `pylmserv --help` imports that it should not need (-X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pylmserv", "--help"],
                          capture_output=True, text=True)
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    return [m for m in HEAVY if m in loaded]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    results = [(name, *timed(cmd, args.repeat)) for name, cmd in CASES]
    base_min, base_med = results[0][1], results[0][2]
    print(f"{'command':<30} {'best ms':>8} {'median ms':>10} {'+best ms':>9} {'+median ms':>11}")
    for name, best, med in results:
        print(f"{name:<30} {best * 1e3:>8.1f} {med * 1e3:>10.1f} {(best - base_min) * 1e3:>9.1f} "
              f"{(med - base_med) * 1e3:>11.1f}")
    heavy = heavy_imports()
    print(f"heavy modules imported by --help: {', '.join(heavy) or 'none'}")
    print(f"(best and median of {args.repeat}; + = over python's own start; goal: --help under 200 ms over python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
