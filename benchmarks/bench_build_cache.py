"""Benchmark a substitution from a build cache against the cold build it replaces, in one run.

  cold     `pylmserv build --portable` into a fresh home, ccache off (the builder)
  push     `pylmserv push --to DIR --sign-key FILE` of that build
  subst    `pylmserv build --portable --no-build` into another fresh home from the cache
           served over HTTP on 127.0.0.1 (download, signature and sha256 checks, install)

  python3 benchmarks/bench_build_cache.py             # the tiny stand-in tree (tests/data/tiny-llama): seconds
  python3 benchmarks/bench_build_cache.py --real      # the real llama.cpp tree (llama-cli + llama-server):
                                                      # a cold portable build, all CPU variants: long
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pylmserv.core.nar import hash_path  # noqa: E402
from pylmserv.core.signing import SecretKey  # noqa: E402
from pylmserv.pins.config import Lock, LockEntry  # noqa: E402
from tests.support.httpserver import serve_directory  # noqa: E402

TARGETS = ("llama-cli", "llama-server")


def tiny_project(work: Path, base: str, www: Path):
    src = work / "tiny-llama"
    shutil.copytree(REPO / "tests" / "data" / "tiny-llama", src)
    with tarfile.open(www / "tiny-llama.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="tiny-llama")
    proj = work / "project"
    proj.mkdir()
    url = f"{base}/tiny-llama.tar.gz"
    (proj / "pylmserv.toml").write_text(f'[sources.llama-cpp]\ntype = "url"\nurl = "{url}"\nunpack = true\n')
    Lock(path=proj / "pylmserv.lock").with_entry(LockEntry(
        "sources", "llama-cpp", url, hash_path(src, "nar"), "nar", rev="tiny-1",
        extra={"type": "url", "unpack": True})).write()
    return proj / "pylmserv.toml", proj / "pylmserv.lock"


def run(config, lock, home, *args, env=None):
    e = dict(os.environ, PYLMSERV_HOME=str(home), CCACHE_DISABLE="1", **(env or {}))
    e.pop("SOURCE_DATE_EPOCH", None)
    argv = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock), *args]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=e)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return took, proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="the real llama.cpp tree (llama-cpp-python sdist)")
    ap.add_argument("-j", "--jobs", default=str(os.cpu_count() or 2))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pylmserv-bench-cache-"))
    www, cache = work / "www", work / "cache"
    www.mkdir()
    cache.mkdir()
    key = SecretKey.generate("bench-1")
    (work / "k.sk").write_text(key.to_text())
    try:
        with serve_directory(www) as base, serve_directory(cache) as cache_url:
            if args.real:
                from tests.support import llama_source

                ctx = llama_source.served_project(work / "real")
                config, lock, _ = ctx.__enter__()
                tree = "llama.cpp (llama-cpp-python %s)" % llama_source.SDIST_VERSION
            else:
                config, lock = tiny_project(work, base, www)
                tree = "tiny stand-in (tests/data/tiny-llama)"
            targets = [a for t in TARGETS for a in ("--target", t)]
            cold, _ = run(config, lock, work / "builder", "build", "--portable", "-j", args.jobs, *targets)
            push, proc = run(config, lock, work / "builder", "push", "--to", str(cache), "--sign-key",
                             str(work / "k.sk"), "--json")
            (m,) = json.loads(proc.stdout)["pushed"]
            size = sum((cache / "sha256" / h).stat().st_size for h in m["files"].values())
            subst, _ = run(config, lock, work / "user", "build", "--portable", "--no-build", *targets,
                           env={"PYLMSERV_SUBSTITUTERS": cache_url, "PYLMSERV_TRUSTED_KEYS": str(key.public)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"tree: {tree}; targets {', '.join(TARGETS)}; {os.cpu_count()} CPUs; files {len(m['files'])}, "
          f"{size / 1e6:.1f} MB")
    print(f"{'step':<10}{'seconds':>10}")
    for name, t in (("cold", cold), ("push", push), ("subst", subst)):
        print(f"{name:<10}{t:>10.2f}")
    print(f"substitution / cold build: {subst / cold:.3f}")


if __name__ == "__main__":
    main()
