"""Benchmark `pylmserv build` against its baselines, measured in the same run.

  cold       `pylmserv build` of the targets into a fresh home + empty ccache
  raw-cold   the same configure + `cmake --build` commands run by hand (fresh dir, empty ccache):
             pylmserv's own overhead on a cold build = cold / raw-cold - 1      (goal < 2 %)
  warm       `pylmserv build --force` into a fresh build dir with the ccache from `cold`
             (goal <= 0.2x cold)
  all        `cmake --build` of ALL targets (what a plain build does), fresh dir + empty ccache
  uptodate   `pylmserv build` when the stamp is current vs `python3 -c pass` (run the bench
             with a clean venv's python for the honest baseline: benchmarks/clean_venv.py), measured in
             turns in the same run (goal <= Python start + 100 ms), with pylmserv's bytecode
             present (a copy of the package compiled first, as an installed package is) and
             absent (a copy without __pycache__, PYTHONDONTWRITEBYTECODE=1). Without `cold`
             in the same run, the build is stamped with stand-in outputs: the up-to-date path
             reads the stamp and stats the outputs, never their content. With
             --instructions (valgrind installed), each of the three is also counted in
             instructions (callgrind), which other jobs on a shared machine do not change.

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


def pylmserv_build(config, lock, env, targets, jobs, *extra, cwd=None):
    argv = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock), "build", "--json",
            "-j", str(jobs), *extra]
    for t in targets:
        argv += ["--target", t]
    dt, proc = timed(argv, env, cwd=cwd)
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


def code_copies(work: Path) -> dict:
    """Two copies of the package: with its bytecode compiled (as installed) and without."""
    import compileall

    out = {}
    for name, compiled in (("pyc", True), ("no-pyc", False)):
        root = work / f"code-{name}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(REPO / "pylmserv", root / "pylmserv", ignore=shutil.ignore_patterns("__pycache__"))
        if compiled:
            assert compileall.compile_dir(str(root / "pylmserv"), quiet=1)
        out[name] = root
    return out


def stamp_standin(home: Path, config: Path, lock: Path, targets) -> None:
    """Stamp the build these arguments ask for with stand-in outputs (nothing compiles)."""
    os.environ["PYLMSERV_HOME"] = str(home)
    from pylmserv.builders import LlamaCppBuild
    from pylmserv.builders.llama_cpp import Request
    from tests.test_build_cli import stamp_standin_build, standin_source

    b = LlamaCppBuild(Request(targets=tuple(targets)), config=config, lock=lock)
    if not b.stamp_path.exists():
        stamp_standin_build(b)
    standin_source(b)  # an up-to-date build fetches a missing locked source back first


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
    ap.add_argument("--instructions", action="store_true",
                    help="uptodate: also count instructions with valgrind's callgrind (load-independent)")
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
        if set(only) - {"uptodate"}:  # builds need the source; an up-to-date answer alone does not
            seed_source(base_home, lock)

        if "cold" in only or "warm" in only:  # (uptodate without cold: a stand-in stamp, below)
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
                stamp_standin(home, config, lock, targets)
            code = code_copies(work)
            envs = {"pyc": dict(env, PYTHONPATH=str(code["pyc"])),
                    "no-pyc": dict(env, PYTHONPATH=str(code["no-pyc"]), PYTHONDONTWRITEBYTECODE="1")}
            wall = {k: [] for k in ("pass", "pyc", "no-pyc")}
            cpu = {k: [] for k in wall}
            for _ in range(args.runs):  # in turns: load on a shared machine hits all three alike
                wall["pass"].append(timed([sys.executable, "-c", "pass"], env)[0])
                cpu["pass"].append(LAST_CPU[0])
                for name in ("pyc", "no-pyc"):
                    # cwd outside the checkout: `python -m` would import ./pylmserv before PYTHONPATH's
                    dt, data = pylmserv_build(config, lock, envs[name], targets, args.jobs, cwd=work)
                    assert data["cache_hit"], data
                    wall[name].append(dt)
                    cpu[name].append(LAST_CPU[0])
            assert not list((code["no-pyc"] / "pylmserv").rglob("*.pyc")), "bytecode was written"
            assert data["paths"], data
            med = {k: statistics.median(v) for k, v in wall.items()}
            low = {k: min(v) for k, v in cpu.items()}
            results["uptodate"] = {k: (med[k], statistics.median(cpu[k]), low[k]) for k in wall}
            rows.append((f"python3 -c pass (median of {args.runs}, wall)", med["pass"],
                         f"baseline; CPU median {statistics.median(cpu['pass']):.3f} s, min {low['pass']:.3f} s"))
            if args.instructions:
                argv = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock), "build",
                        "--json", *[a for t_ in targets for a in ("--target", t_)]]
                ir = {"pass": instructions([sys.executable, "-c", "pass"], env, work),
                      **{k: instructions(argv, envs[k], work) for k in ("pyc", "no-pyc")}}
                for k in ("pyc", "no-pyc"):
                    rows.append((f"instructions, {k} (callgrind)", ir[k] / 1e9,
                                 f"+{(ir[k] - ir['pass']) / 1e6:.0f} M over `python3 -c pass` ({ir['pass'] / 1e6:.0f} M): "
                                 f"{(ir[k] - ir['pass']) / ir['pass']:.2f}x Python start; seconds column = G instructions"))
            for name, what in (("pyc", "bytecode present"), ("no-pyc", "bytecode absent")):
                rows.append((f"up-to-date pylmserv build, {what} (median of {args.runs}, wall)", med[name],
                             f"+{(med[name] - med['pass']) * 1000:.0f} ms wall, CPU +{(low[name] - low['pass']) * 1000:.0f} "
                             f"ms (min) over Python start" + (" (goal <= 100 ms)" if name == "pyc" else "")))

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


def instructions(argv, env, cwd) -> int:
    """Instructions one run executes (valgrind --tool=callgrind: the whole process tree)."""
    import re

    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["valgrind", "--tool=callgrind", "--trace-children=yes",
                               f"--callgrind-out-file={tmp}/cg.%p", *argv], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=600)
    counts = [int(n) for n in re.findall(r"Collected : (\d+)", proc.stderr)]
    if proc.returncode != 0 or not counts:
        raise SystemExit(f"valgrind failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return sum(counts)


def _split(line: str):
    import shlex

    return shlex.split(line)


if __name__ == "__main__":
    main()
