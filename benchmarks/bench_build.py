"""Benchmark `pylmserv build` against its baselines, measured in the same run.

  cold       `pylmserv build` of the targets into a fresh home + empty ccache
  raw-cold   the same configure + `cmake --build` commands run by hand (fresh dir, empty ccache):
             pylmserv's own overhead on a cold build = cold / raw-cold - 1      (goal < 2 %)
  warm       `pylmserv build --force` into a fresh build dir with the ccache from `cold`
             (goal <= 0.2x cold)
  all        `cmake --build` of ALL targets (what a plain build does), fresh dir + empty ccache
  uptodate   `pylmserv build` when the stamp is current vs `python3 -c pass`
             (goal <= Python start + 100 ms): replayed from the record the build left
             (store/replay.py), and the full command (no record: the config, lock,
             environment or pylmserv changed since)

The source is the real llama.cpp tree vendored in the llama-cpp-python sdist, served on
127.0.0.1 and verified into the store once before timing (fetching is not build time).

  python3 benchmarks/bench_build.py                    # everything (cold builds: many minutes)
  python3 benchmarks/bench_build.py --only uptodate     # seconds
  python3 benchmarks/bench_build.py --only cold,raw-cold,warm --targets llama-cli,llama-server
"""
from __future__ import annotations

import argparse
import json
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

from tests.support import llama_source  # noqa: E402

ALL = ("uptodate", "cold", "raw-cold", "warm", "all")


def children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


LAST_CPU = [0.0]  # CPU seconds (user+sys) of the last timed() command: steadier than wall time on a shared machine


def timed(argv, env, cwd=None, timeout=7200, check=True):
    c0 = children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout)
    dt = time.perf_counter() - t0
    LAST_CPU[0] = children_cpu() - c0
    if check and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, argv))}\n{proc.stderr[-3000:]}")
    return dt, proc


def pylmserv_build(config, lock, env, targets, jobs, *extra):
    argv = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock), "build", "--json",
            "-j", str(jobs), *extra]
    for t in targets:
        argv += ["--target", t]
    dt, proc = timed(argv, env)
    return dt, json.loads(proc.stdout)


def fresh_env(home: Path, ccache: Path) -> dict:
    env = dict(os.environ)
    env.update({"PYLMSERV_HOME": str(home), "CCACHE_DIR": str(ccache)})
    env.pop("SOURCE_DATE_EPOCH", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its .pyc files
    return env


def seed_source(home: Path, lock: Path) -> Path:
    """Fetch + verify the served source into `home` (not timed)."""
    os.environ["PYLMSERV_HOME"] = str(home)
    from pylmserv.pins.config import load_lock
    from pylmserv.store.trees import ensure_source

    return ensure_source(load_lock(lock).entry("sources", "llama-cpp"), home)


def share_source(src_home: Path, dst_home: Path) -> None:
    """Give a fresh home the already-verified source tree (a copy: same path layout)."""
    for tree in (src_home / "sources").iterdir():
        target = dst_home / "sources" / tree.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(tree, target, symlinks=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ALL), help="comma list of: " + ", ".join(ALL))
    ap.add_argument("--targets", default="llama-cli,llama-server,llama-bench")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--runs", type=int, default=10, help="repetitions of the up-to-date measurement")
    ap.add_argument("--workdir", type=Path, help="keep build trees here (default: a temp dir, removed)")
    args = ap.parse_args()
    only = [x for x in args.only.split(",") if x]
    targets = [t for t in args.targets.split(",") if t]
    llama_source.require_sdist = lambda: None
    if not llama_source.have_sdist():
        raise SystemExit(f"{llama_source.SDIST} missing: run scripts/setup-dev.sh")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    results = {}
    with llama_source.served_project(work / "serve") as (config, lock, _):
        base_home = work / "home-seed"
        seed_source(base_home, lock)

        if "cold" in only or "warm" in only or "uptodate" in only:
            home, cc = work / "home-cold", work / "ccache-cold"
            share_source(base_home, home)
            dt, data = pylmserv_build(config, lock, fresh_env(home, cc), targets, args.jobs)
            results["cold"] = dt
            results["cold_cpu"] = LAST_CPU[0]
            results["cold_data"] = data
            rows.append(("cold: pylmserv build " + "+".join(targets), dt, f"CPU {LAST_CPU[0]:.1f} s; baseline for warm"))

        if "raw-cold" in only and "cold_data" in results:
            stamp = json.loads((Path(results["cold_data"]["build_dir"]) / "pylmserv-stamp.json").read_text())
            configure, build = stamp["extra"]["commands"]
            home, cc = work / "home-raw", work / "ccache-raw"
            share_source(base_home, home)
            env = fresh_env(home, cc)
            env["CCACHE_BASEDIR"] = str(home)
            old_bd = results["cold_data"]["build_dir"]
            new_bd = str(home / "builds" / "raw")
            conf = [a.replace(old_bd, new_bd).replace(str(work / "home-cold"), str(home)) for a in _split(configure)]
            bld = [a.replace(old_bd, new_bd) for a in _split(build)]
            t1, _ = timed(conf, env)
            c1 = LAST_CPU[0]
            t2, _ = timed(bld, env)
            cpu = c1 + LAST_CPU[0]
            results["raw-cold"] = t1 + t2
            overhead = results["cold"] / results["raw-cold"] - 1
            cpu_overhead = results["cold_cpu"] / cpu - 1
            rows.append(("raw-cold: same cmake configure + --build by hand", t1 + t2,
                         f"CPU {cpu:.1f} s; pylmserv overhead {overhead * 100:+.1f}% wall, "
                         f"{cpu_overhead * 100:+.2f}% CPU (goal < 2%)"))

        if "warm" in only and "cold" in results:
            home = work / "home-warm"
            share_source(base_home, home)
            dt, data = pylmserv_build(config, lock, fresh_env(home, work / "ccache-cold"), targets, args.jobs, "--force")
            results["warm"] = dt
            rows.append(("warm: fresh build dir, ccache from cold", dt,
                         f"{dt / results['cold']:.3f}x cold (goal <= 0.2x)"))

        if "uptodate" in only:
            home = work / "home-cold"
            env = fresh_env(home, work / "ccache-cold")
            if "cold" not in results:
                share_source(base_home, home)
                pylmserv_build(config, lock, env, targets, args.jobs)
            replay_dir = home / "replay"  # store/replay.py: what an up-to-date answer printed
            base, base_cpu, full, full_cpu, upto, upto_cpu = [], [], [], [], [], []
            for _ in range(args.runs):
                base.append(timed([sys.executable, "-c", "pass"], env)[0])
                base_cpu.append(LAST_CPU[0])
                shutil.rmtree(replay_dir, ignore_errors=True)  # no record: the full command
                dt, data = pylmserv_build(config, lock, env, targets, args.jobs)
                assert data["cache_hit"], data
                full.append(dt)
                full_cpu.append(LAST_CPU[0])
                dt, data = pylmserv_build(config, lock, env, targets, args.jobs)  # replayed from its record
                assert data["cache_hit"], data
                upto.append(dt)
                upto_cpu.append(LAST_CPU[0])
            b, f, u = statistics.median(base), statistics.median(full), statistics.median(upto)
            bc, fc, uc = statistics.median(base_cpu), statistics.median(full_cpu), statistics.median(upto_cpu)
            rows.append((f"python3 -c pass (median of {args.runs}, wall)", b, f"baseline; CPU {bc:.3f} s"))
            rows.append((f"up-to-date, no record (median of {args.runs})", f,
                         f"+{(f - b) * 1000:.0f} ms wall, +{(fc - bc) * 1000:.0f} ms CPU: the full command, "
                         f"which records its answer"))
            rows.append((f"up-to-date pylmserv build (median of {args.runs}, wall)", u,
                         f"+{(u - b) * 1000:.0f} ms wall, +{(uc - bc) * 1000:.0f} ms CPU over Python start "
                         f"(goal <= 100 ms): replayed"))

        if "all" in only:
            home, cc = work / "home-all", work / "ccache-all"
            share_source(base_home, home)
            env = fresh_env(home, cc)
            env["CCACHE_BASEDIR"] = str(home)
            dt, data = pylmserv_build(config, lock, env, ["llama-cli"], args.jobs, "--dry-run")
            configure, build = data["commands"]
            t1, _ = timed(_split(configure), env)
            build_all = _split(build)
            build_all = build_all[:build_all.index("--target")] + ["-j", str(args.jobs)]
            t2, _ = timed(build_all, env)
            ratio = f"default targets (cold) = {results['cold'] / (t1 + t2):.2f}x of this" if "cold" in results else ""
            rows.append(("all: cmake --build, every target", t1 + t2, ratio))

    print(f"\nbench_build  (jobs={args.jobs}, targets={','.join(targets)}, {os.cpu_count()} CPUs)\n")
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"{'measurement':<{width}}  {'seconds':>9}  note")
    print(f"{'-' * width}  {'-' * 9}  {'-' * 40}")
    for name, secs, note in rows:
        print(f"{name:<{width}}  {secs:>9.3f}  {note}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _split(line: str):
    import shlex

    return shlex.split(line)


if __name__ == "__main__":
    main()
