"""Benchmark fetching a model through a mirror against the same bytes from an nginx origin,
every row in the same run.

  origin         `pylmserv fetch m` from the URL in the lock, served by nginx (the baseline)
  served store   the same, with PYLMSERV_MIRRORS = another store's blobs/ served by nginx
                 (content-addressed HTTP: BASE/sha256/HEX)
  registry       the same, with PYLMSERV_MIRRORS = oci://127.0.0.1:PORT/bench/models, a real
                 docker-registry (CNCF distribution) holding what `pylmserv push` uploaded
                                                             goal: each mirror <= 1.5x origin

Each run is a real `python -m pylmserv fetch m --json` process with a fresh PYLMSERV_HOME;
its time is the `seconds` the fetch reports (from the start of the fetch to the verified,
fsynced blob in the store), and the wall time of the process is shown beside it. Medians of
--reps runs, rows interleaved so that a noisy moment hits all of them. Needs nginx-light and
docker-registry (scripts/setup-dev.sh installs them).

Usage: python benchmarks/bench_share.py [--size-mb 256] [--reps 5]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.registry import nginx_dir, registry  # noqa: E402

MB = 1 << 20


def cli(args, env, cwd):
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [full.get("PYTHONPATH")] if p])
    full.update(env)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pylmserv", *args], env=full, cwd=cwd, capture_output=True,
                          text=True, timeout=1800)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"pylmserv {' '.join(args)} failed:\n{proc.stderr}")
    return proc, wall


def write_model(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(4 * MB)
    with open(path, "wb") as f:
        head = b"GGUF" + (3).to_bytes(4, "little") + bytes(16)
        f.write(head)
        h.update(head)
        left = size - len(head)
        while left:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-share-") as d, contextlib.ExitStack() as stack:
        tmp = Path(d)
        www = tmp / "www"
        www.mkdir()
        digest = write_model(www / "m.gguf", args.size_mb * MB)
        origin = stack.enter_context(nginx_dir(www, tmp / "origin"))
        proj = tmp / "proj"
        proj.mkdir()
        (proj / "pylmserv.toml").write_text(f'[models.m]\nurl = "{origin.url}/m.gguf"\n')
        store_a = {"PYLMSERV_HOME": str(tmp / "A"), "PYLMSERV_MIRRORS": ""}
        cli(["prefetch"], store_a, proj)
        cli(["fetch", "m", "--no-progress"], store_a, proj)
        served = stack.enter_context(nginx_dir(tmp / "A" / "blobs", tmp / "served"))
        reg = stack.enter_context(registry(tmp / "reg"))
        cli(["push", "m", "--to", f"oci://{reg.host}/bench/models", "--no-progress"], store_a, proj)
        rows = {"origin (nginx)": "", "served store (nginx)": served.url,
                "registry (docker-registry)": f"oci://{reg.host}/bench/models"}
        results = {name: ([], []) for name in rows}
        for rep in range(args.reps):
            for name, mirrors in rows.items():
                home = tmp / f"B-{rep}-{len(results[name][0])}-{abs(hash(name))}"
                proc, wall = cli(["fetch", "m", "--json", "--no-progress"],
                                 {"PYLMSERV_HOME": str(home), "PYLMSERV_MIRRORS": mirrors}, proj)
                got = json.loads(proc.stdout)[0]
                assert got["sha256"] == digest, got
                if mirrors:
                    assert "from mirror" in proc.stderr, proc.stderr
                results[name][0].append(got["seconds"])
                results[name][1].append(wall)
                subprocess.run(["rm", "-rf", str(home)], check=True)
        base = statistics.median(results["origin (nginx)"][0])
        print(f"model: {args.size_mb} MiB, median of {args.reps} runs, fetch seconds (wall seconds)")
        print(f"{'source':<28}{'fetch s':>10}{'wall s':>10}{'MiB/s':>10}{'vs origin':>11}  goal")
        for name in rows:
            fetch_s = statistics.median(results[name][0])
            wall_s = statistics.median(results[name][1])
            ratio = fetch_s / base
            goal = "" if name.startswith("origin") else ("<= 1.5x: met" if ratio <= 1.5 else "<= 1.5x: MISSED")
            print(f"{name:<28}{fetch_s:>10.2f}{wall_s:>10.2f}{args.size_mb / fetch_s:>10.0f}{ratio:>10.2f}x  {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
