"""An up-to-date `pylmserv build` has one judge: the build skeleton's stamp check
(builders/base.py). What the removed replay record (store/replay.py, issue 18) got wrong
now holds: `--backend auto` detects again on every run, another machine type is another
build, and no state file - an edited stamp, a record an older pylmserv left in the home -
makes `build` touch anything outside the home or install what it points at."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pylmserv.builders import LlamaCppBuild
from pylmserv.builders.llama_cpp import Request
from pylmserv.store import records as stamps
from tests.conftest import run_cli
from tests.test_build_cli import project, recording_tool, stamp_standin_build, standin_source

TARGETS = ("llama-cli", "llama-server")
REFETCH = "missing from the store"  # the up-to-date path restoring a missing source (base.py)


@pytest.fixture
def stamped(home, tmp_path):
    """A stamped llama.cpp cpu build with stand-in outputs (nothing compiles), the arguments
    that ask for it, and an env whose cmake/cc/nvidia-smi record any call."""
    config, lock = project(tmp_path)
    b = LlamaCppBuild(Request(targets=TARGETS), config=config, lock=lock)
    stamp_standin_build(b)
    standin_source(b)  # an up-to-date build fetches a missing locked source back first
    marker = tmp_path / "invoked"
    for name in ("cmake", "ninja", "cc", "c++", "nvidia-smi"):
        recording_tool(tmp_path / "tools", name, marker)
    env = {"PYLMSERV_HOME": str(home), "PATH": f"{tmp_path / 'tools'}{os.pathsep}{os.environ['PATH']}"}
    args = ["--config", config, "--lock", lock, "build", "--target", "llama-cli", "--target", "llama-server"]
    return b, args, env, marker


def without_source(b) -> None:
    """Remove the stand-in source from the store: a build that is not up to date then goes
    on to fetch it from the (unreachable) locked URL, exit 3 naming it, before any tool runs.
    (A build taken as up to date would fetch it too, but says so first: REFETCH.)"""
    shutil.rmtree(standin_source(b))


def outside_snapshot(root: Path) -> dict:
    """Every path under `root` with its kind, content or link target, and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p), st.st_mtime_ns)
        elif p.is_dir():
            out[str(p)] = ("dir", None, st.st_mtime_ns)
        else:
            out[str(p)] = ("file", p.read_bytes(), st.st_mtime_ns)
    return out


def test_the_same_answer_twice_without_probes(stamped):
    b, args, env, marker = stamped
    first = run_cli(*args, "--json", env=env)
    second = run_cli(*args, "--json", env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, c = json.loads(first.stdout), json.loads(second.stdout)
    assert a["cache_hit"] and c["cache_hit"]
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in c.items() if k != "seconds"}
    assert not marker.exists()  # no toolchain probe on the up-to-date path


def test_an_up_to_date_build_reinstalls_what_was_removed(stamped, home):
    b, args, env, _ = stamped
    run_cli(*args, env=env, check=True)
    installed = home / "bin" / "llama.cpp-cpu" / b.key / "llama-cli"
    current = home / "bin" / "llama.cpp-cpu" / "current"
    installed.unlink()
    current.unlink()
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0 and "up to date" in proc.stderr, proc.stderr
    assert installed.read_text() == "#!/bin/sh\necho stand-in llama-cli\n"
    assert os.readlink(current) == b.key


@pytest.mark.parametrize("change", ["output", "stamp", "stamp-key", "lock-pin"])
def test_a_changed_build_is_built_again(stamped, change):
    """Each goes on to fetch the (unreachable) locked source: exit 3 naming it."""
    b, args, env, _ = stamped
    run_cli(*args, env=env, check=True)
    if change == "output":
        (b.build_dir / "bin" / "llama-cli").write_text("#!/bin/sh\necho changed\n")
    elif change == "stamp":
        b.stamp_path.unlink()
    elif change == "stamp-key":  # the same build dir stamped by other inputs
        st = stamps.read_stamp(b.stamp_path)
        stamps.write_stamp(b.stamp_path, stamps.make_stamp(dict(b.inputs, rev="other"), st.output_paths()))
    else:
        lock = Path(args[3])
        lock.write_text(lock.read_text().replace('rev = "b9941"', 'rev = "b9990"'))
    without_source(b)
    proc = run_cli(*args, env=env)
    assert proc.returncode == 3 and "never-fetched.tar.gz" in proc.stderr and REFETCH not in proc.stderr, proc.stderr


@pytest.mark.skipif(not shutil.which("setarch") or os.uname().machine != "x86_64",
                    reason="needs setarch on x86-64 (linux32: the kernel reports i686)")
def test_another_machine_type_is_another_build(stamped):
    """The replay record answered a `setarch linux32` run with the x86-64 build; the key
    holds the machine type, so it is another build now."""
    b, args, env, _ = stamped
    run_cli(*args, env=env, check=True)
    without_source(b)
    import subprocess
    import sys

    full = dict(os.environ, **env)
    proc = subprocess.run(["setarch", "linux32", sys.executable, "-m", "pylmserv", *map(str, args)],
                          capture_output=True, text=True, env=full, timeout=300)
    assert proc.returncode == 3 and "never-fetched.tar.gz" in proc.stderr and REFETCH not in proc.stderr, proc.stderr


def test_backend_auto_detects_again_on_every_run(home, tmp_path, monkeypatch):
    """A machine that gains what a better backend needs gets that backend on the next
    `build --backend auto`, not the build it answered before (both builds stamped here)."""
    from pylmserv.builders import auto
    from pylmserv.cli import cli

    config, lock = project(tmp_path)
    for backend in ("cpu", "blas"):
        b = LlamaCppBuild(Request(backend=backend, targets=TARGETS), config=config, lock=lock)
        stamp_standin_build(b)
    standin_source(b)
    chosen = []

    def machine(now):
        def choose(engine="llama.cpp", **kw):
            chosen.append(now)
            return auto.BackendChoice(now, f"stand-in detection: {now}")
        return choose

    args = ["--config", str(config), "--lock", str(lock), "build", "--backend", "auto", "--json",
            "--target", "llama-cli", "--target", "llama-server"]
    answers = []
    for now in ("cpu", "blas", "cpu"):
        monkeypatch.setattr(auto, "choose_backend", machine(now))
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        answers.append((doc["backend"], doc["cache_hit"], doc["auto"]))
    assert chosen == ["cpu", "blas", "cpu"]  # detected on each run
    assert answers == [("cpu", True, "--backend auto chose cpu: stand-in detection: cpu"),
                       ("blas", True, "--backend auto chose blas: stand-in detection: blas"),
                       ("cpu", True, "--backend auto chose cpu: stand-in detection: cpu")]


def test_an_edited_stamp_installs_nothing_from_outside_and_touches_nothing_there(stamped, home, tmp_path):
    """A stamp whose outputs name files outside the build directory (with their true size
    and mtime, so they look unchanged) is not this build's: no copy of them is installed,
    nothing outside the home changes, and the build goes on to build again."""
    b, args, env, _ = stamped
    run_cli(*args, env=env, check=True)
    outside = tmp_path / "outside"
    (outside / "bin").mkdir(parents=True)
    for name in TARGETS:
        (outside / "bin" / name).write_text(f"#!/bin/sh\necho not yours: {name}\n")
    os.symlink(outside / "bin", outside / "link")
    before = outside_snapshot(outside)
    installed = home / "bin" / "llama.cpp-cpu" / b.key
    shutil.rmtree(installed)
    without_source(b)
    st = stamps.read_stamp(b.stamp_path)
    for target in (outside / "bin", outside / "link", b.build_dir / "bin" / ".." / ".." / ".." / ".." / "outside" / "bin"):
        edited = stamps.make_stamp(b.inputs, {n: target / n for n in TARGETS})
        stamps.write_stamp(b.stamp_path, edited)
        proc = run_cli(*args, env=env)
        assert proc.returncode == 3 and "never-fetched.tar.gz" in proc.stderr and REFETCH not in proc.stderr, proc.stderr
        assert "outside its build directory" in proc.stderr
        assert outside_snapshot(outside) == before
        assert not any(p.is_file() for p in installed.rglob("*")) if installed.exists() else True
    stamps.write_stamp(b.stamp_path, st)  # the true stamp: up to date again
    standin_source(b)
    assert run_cli(*args, env=env, check=True).returncode == 0


def test_a_replay_record_left_by_an_older_pylmserv_is_never_read(stamped, home, tmp_path):
    """Homes of older versions hold `replay/<hash>.json` records (what to install where,
    which link to re-point, what to print). Nothing reads them any more: a planted record
    that points outside the home changes neither the answer nor anything outside."""
    b, args, env, _ = stamped
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "llama-cli").write_text("precious\n")
    before = outside_snapshot(victim)
    (home / "replay").mkdir(parents=True, exist_ok=True)
    record = {"version": 1, "argv": list(map(str, args)), "stderr": "llama.cpp (cpu): up to date; planted\n",
              "bindir": str(victim), "current": str(victim / "current"), "install": ["llama-cli"],
              "stamp": str(b.stamp_path), "key": b.key}
    for i in range(3):
        (home / "replay" / f"{i:064x}.json").write_text(json.dumps(record))
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0 and "planted" not in proc.stderr and "up to date" in proc.stderr, proc.stderr
    assert outside_snapshot(victim) == before
