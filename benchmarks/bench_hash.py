"""Hashing speed vs the reference tools, measured in the same run.

  NAR sha256 of the real llama.cpp tree (vendor/llama.cpp of the llama-cpp-python sdist),
  whole processes, wall clock, paired: `pylmserv hash TREE` and `nix hash path TREE` run
  one after the other (which goes first alternates), --repeat pairs, both answers checked
  equal every time; the figure is the median of the pairs' ratios.
      goal (issue 19): pylmserv hash <= 1.0x nix hash path
  In-process, best of --repeat (no start-up in it): pylmserv.core.nar.nar_hash vs
  `nix-hash --type sha256 --base32`, and the naive Python NAR reference.
  flat sha256 of a 1 GiB file: pylmserv.core.hashing.file_hash vs `sha256sum`.

Warm page cache (a first unmeasured run warms it).

    python3 benchmarks/bench_hash.py [--sdist PATH] [--repeat 9] [--flat-gib 1]

Run it with the Python an installed pylmserv runs under: a clean venv
(`python3 benchmarks/clean_venv.py DIR`, then `DIR/bin/python benchmarks/bench_hash.py`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pylmserv.core.hashing import Hash, file_hash
from pylmserv.core.nar import nar_hash

DEFAULT_SDIST = Path.home() / ".cache" / "pylmserv-tests" / "llama_cpp_python-0.3.36.tar.gz"
NIX_ENV = dict(os.environ, NIX_CONFIG="experimental-features = nix-command", NIX_REMOTE="")


def best_of(repeat: int, fn):
    fn()  # warm-up: page cache, imports
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def run(cmd) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=NIX_ENV, timeout=600).stdout.strip()


def llama_tree(sdist: Path, work: Path) -> Path:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tar.extractall(work, members=members, filter="tar") if hasattr(tarfile, "tar_filter") \
            else tar.extractall(work, members=members)
    (tree,) = list(work.glob("*/vendor/llama.cpp"))
    return tree


def naive_nar_hash(path) -> Hash:
    """A straightforward NAR hasher (whole-file reads, one update per token, listdir):
    the "naive Python" reference the issue quotes at about 2x nix-hash."""
    import hashlib
    import stat
    import struct

    h = hashlib.sha256()

    def s(b: bytes):
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
        h.update(b"\0" * ((-len(b)) % 8))

    def node(p: bytes):
        st = os.lstat(p)
        s(b"(")
        s(b"type")
        if stat.S_ISLNK(st.st_mode):
            s(b"symlink"), s(b"target"), s(os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            s(b"directory")
            for name in sorted(os.listdir(p)):
                s(b"entry"), s(b"("), s(b"name"), s(name), s(b"node")
                node(p + b"/" + name)
                s(b")")
        else:
            s(b"regular")
            if st.st_mode & 0o100:
                s(b"executable"), s(b"")
            s(b"contents")
            with open(p, "rb") as f:
                s(f.read())
        s(b")")

    s(b"nix-archive-1")
    node(os.fsencode(path))
    return Hash.from_hashlib(h)


def tree_stats(path: Path):
    files = size = 0
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            if not os.path.islink(p):
                files += 1
                size += os.path.getsize(p)
    return files, size


def paired(tree: Path, repeat: int):
    """(nix wall list, pylmserv wall list, ratio list): whole processes, alternating order."""
    py_cmd = [sys.executable, "-m", "pylmserv", "hash", str(tree)]
    py_env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    py_env.pop("PYTHONDONTWRITEBYTECODE", None)
    nix_cmd = ["nix", "hash", "path", str(tree)]

    def once(cmd, env):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=600).stdout.strip()
        return time.perf_counter() - t0, Hash.parse(out)

    once(nix_cmd, NIX_ENV), once(py_cmd, py_env)  # warm-up: page cache, .pyc files
    nix_t, py_t, ratios = [], [], []
    for i in range(repeat):
        if i % 2:
            (tp, hp), (tn, hn) = once(py_cmd, py_env), once(nix_cmd, NIX_ENV)
        else:
            (tn, hn), (tp, hp) = once(nix_cmd, NIX_ENV), once(py_cmd, py_env)
        assert hp == hn, f"pylmserv hash {hp} != nix hash path {hn}"
        nix_t.append(tn)
        py_t.append(tp)
        ratios.append(tp / tn)
    return nix_t, py_t, ratios


def python_start(repeat: int, *flags: str) -> float:
    """Median wall seconds of `python3 [flags] -c pass` with pylmserv's environment: the part
    of every `pylmserv` process that is the interpreter's own start (with -S: without site
    and the .pth files of the site-packages, which differ from machine to machine)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *flags, "-c", "pass"], check=True, env=env, timeout=60)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, default=DEFAULT_SDIST)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--flat-gib", type=float, default=1.0)
    args = ap.parse_args()
    if not args.sdist.exists():
        print(f"missing {args.sdist}: run scripts/setup-dev.sh", file=sys.stderr)
        return 2
    import statistics

    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-hash.") as tmp:
        tmp = Path(tmp)
        tree = llama_tree(args.sdist, tmp)
        files, size = tree_stats(tree)
        what = f"NAR, llama.cpp tree ({files} files, {size / 1e6:.0f} MB)"
        nix_t, py_t, ratios = paired(tree, args.repeat)
        paired_row = (what, statistics.median(nix_t), statistics.median(py_t), statistics.median(ratios),
                      min(ratios), max(ratios))
        t_start, t_bare = python_start(args.repeat), python_start(args.repeat, "-S")
        t_py, h_py = best_of(args.repeat, lambda: nar_hash(tree))
        t_nh, out = best_of(args.repeat, lambda: run(["nix-hash", "--type", "sha256", "--base32", str(tree)]))
        assert Hash.parse(out, algo="sha256") == h_py, "pylmserv and nix-hash disagree"
        rows.append((what + ", in-process", "nix-hash", t_nh, t_py))
        t_naive, h_naive = best_of(args.repeat, lambda: naive_nar_hash(tree))
        assert h_naive == h_py
        rows.append(("naive Python NAR (reference, not pylmserv)", "nix-hash", t_nh, t_naive))
        big = tmp / "big.bin"
        chunk = os.urandom(1 << 20)
        with open(big, "wb") as f:
            for _ in range(int(args.flat_gib * 1024)):
                f.write(chunk)
        t_sum, out = best_of(args.repeat, lambda: run(["sha256sum", str(big)]))
        t_flat, h_flat = best_of(args.repeat, lambda: file_hash(big))
        assert out.split()[0] == h_flat.hex, "pylmserv and sha256sum disagree"
        rows.append((f"flat sha256, {args.flat_gib:g} GiB file", "sha256sum", t_sum, t_flat))
    load_after = os.getloadavg()[0]
    lines = [f"load average {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} CPUs); warm cache",
             "", "| what | baseline | baseline s | pylmserv s | ratio (median of pairs) | min-max ratio | goal | met |",
             "|---|---|---:|---:|---:|---:|---:|---|",
             f"| {paired_row[0]}: whole processes, {args.repeat} pairs | `nix hash path` | {paired_row[1]:.3f} | "
             f"{paired_row[2]:.3f} | {paired_row[3]:.2f}x | {paired_row[4]:.2f}-{paired_row[5]:.2f}x | <= 1.0x | "
             f"{'yes' if paired_row[3] <= 1.0 else 'NO'} |",
             f"(of pylmserv's time, Python's own start: `python3 -c pass` took {t_start:.3f} s, median of "
             f"{args.repeat}, same run; without site and its .pth files, `python3 -S -c pass`: {t_bare:.3f} s)",
             "", "| what | baseline | baseline s | candidate s | ratio |", "|---|---|---:|---:|---:|"]
    for what, base, tb, tp in rows:
        lines.append(f"| {what} | {base} | {tb:.3f} | {tp:.3f} | {tp / tb:.2f}x |")
    lines.append(f"(in-process rows: best of {args.repeat}; ratio = candidate / baseline, lower is better)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
