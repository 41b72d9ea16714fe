"""Hashing speed vs the reference tools, measured in the same run.

  NAR sha256 of the real llama.cpp tree (vendor/llama.cpp of the llama-cpp-python sdist)
      pylmserv.core.nar.nar_hash   vs  `nix-hash --type sha256 --base32`  and  `nix hash path`
  flat sha256 of a 1 GiB file
      pylmserv.core.hashing.file_hash  vs  `sha256sum`

Each timing is the best of --repeat runs on a warm page cache (the first run warms it).
The goal (issue 2): NAR hashing within 1.25x of nix-hash's wall time.

    python3 benchmarks/bench_hash.py [--sdist PATH] [--repeat 5] [--flat-gib 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, default=DEFAULT_SDIST)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--flat-gib", type=float, default=1.0)
    args = ap.parse_args()
    if not args.sdist.exists():
        print(f"missing {args.sdist}: run scripts/setup-dev.sh", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-hash.") as tmp:
        tmp = Path(tmp)
        tree = llama_tree(args.sdist, tmp)
        files, size = tree_stats(tree)
        t_py, h_py = best_of(args.repeat, lambda: nar_hash(tree))
        if shutil.which("nix-hash"):
            t_nh, out = best_of(args.repeat, lambda: run(["nix-hash", "--type", "sha256", "--base32", str(tree)]))
            assert Hash.parse(out, algo="sha256") == h_py, "pylmserv and nix-hash disagree"
            t_nix, out = best_of(args.repeat, lambda: run(["nix", "hash", "path", str(tree)]))
            assert Hash.parse(out) == h_py, "pylmserv and nix hash path disagree"
            rows.append((f"NAR llama.cpp tree ({files} files, {size / 1e6:.0f} MB)", "nix-hash", t_nh, t_py))
            rows.append(("", "nix hash path", t_nix, t_py))
            t_naive, h_naive = best_of(args.repeat, lambda: naive_nar_hash(tree))
            assert h_naive == h_py
            rows.append(("naive Python NAR (reference, not pylmserv)", "nix-hash", t_nh, t_naive))
        else:
            print("nix-hash not found: NAR rows skipped", file=sys.stderr)
        big = tmp / "big.bin"
        chunk = os.urandom(1 << 20)
        with open(big, "wb") as f:
            for _ in range(int(args.flat_gib * 1024)):
                f.write(chunk)
        t_sum, out = best_of(args.repeat, lambda: run(["sha256sum", str(big)]))
        t_flat, h_flat = best_of(args.repeat, lambda: file_hash(big))
        assert out.split()[0] == h_flat.hex, "pylmserv and sha256sum disagree"
        rows.append((f"flat sha256, {args.flat_gib:g} GiB file", "sha256sum", t_sum, t_flat))
    print(f"{'what':<44} {'baseline':<14} {'baseline s':>10} {'candidate s':>11} {'ratio':>6}")
    for what, base, tb, tp in rows:
        print(f"{what:<44} {base:<14} {tb:>10.3f} {tp:>11.3f} {tp / tb:>5.2f}x")
    print(f"(best of {args.repeat}, warm cache; ratio = candidate / baseline, lower is better; goal NAR <= 1.25x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
