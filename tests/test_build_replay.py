"""An up-to-date `pylmserv build` answered from its record (store/replay.py) without
loading click or the builders - and never when anything the answer depended on changed.

Each run goes through `pylmserv.__main__.main`, as the `pylmserv` script does, in a fresh
interpreter that then says which of its modules were loaded: a replayed answer loads
neither click nor pylmserv.builders; the full command loads both."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.builders import LlamaCppBuild
from pylmserv.builders.llama_cpp import Request
from pylmserv.store import gc, replay
from pylmserv.store import records as stamps
from pylmserv.store.trees import store_path
from tests.test_build_cli import TINY_CMAKE, project, recording_tool, stamp_standin_build

REPO = Path(__file__).resolve().parent.parent
DRIVER = ("import sys\nfrom pylmserv.__main__ import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
          "    print('LOADED', 'click' in sys.modules, 'pylmserv.builders' in sys.modules, file=sys.stderr)\n")
TARGETS = ("llama-cli", "llama-server")


def pylmserv(*args, env, cwd=None):
    """(returncode, stdout, stderr without the LOADED line, replayed?)"""
    full = dict(os.environ, PYTHONPATH=str(REPO), **env)
    proc = subprocess.run([sys.executable, "-c", DRIVER, *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=300)
    lines = proc.stderr.splitlines(keepends=True)
    loaded = [ln for ln in lines if ln.startswith("LOADED ")]
    assert len(loaded) == 1, proc.stderr
    click_loaded, builders_loaded = loaded[0].split()[1:]
    assert click_loaded == builders_loaded, loaded  # both or neither
    return proc.returncode, proc.stdout, "".join(ln for ln in lines if ln not in loaded), click_loaded == "False"


@pytest.fixture
def stamped(home, tmp_path):
    """A stamped llama.cpp build with stand-in outputs (nothing compiles), the arguments that
    ask for it, and an env whose cmake/cc/nvidia-smi record any call (the fast path makes none)."""
    config, lock = project(tmp_path)
    b = LlamaCppBuild(Request(targets=TARGETS), config=config, lock=lock)
    stamp_standin_build(b)
    marker = tmp_path / "invoked"
    for name in ("cmake", "ninja", "cc", "c++", "nvidia-smi"):
        recording_tool(tmp_path / "tools", name, marker)
    env = {"PYLMSERV_HOME": str(home), "PATH": f"{tmp_path / 'tools'}{os.pathsep}{os.environ['PATH']}"}
    args = ["--config", config, "--lock", lock, "build", "--target", "llama-cli", "--target", "llama-server"]
    return b, args, env, marker


def test_second_identical_build_is_replayed_with_the_same_answer(stamped, home):
    b, args, env, marker = stamped
    rc, out, err, replayed = pylmserv(*args, "--json", env=env)
    assert rc == 0 and not replayed, err
    first = json.loads(out)
    assert first["cache_hit"] is True and len(list((home / replay.DIR).glob("*.json"))) == 1
    rc, out, err2, replayed = pylmserv(*args, "--json", env=env)
    assert rc == 0 and replayed, err2
    again = json.loads(out)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    # the human answer too (a separate invocation, so a separate record)
    _, _, text, replayed = pylmserv(*args, env=env)
    assert not replayed and "llama.cpp (cpu): up to date" in text
    _, _, text_again, replayed = pylmserv(*args, env=env)
    assert replayed and text_again == text
    assert not marker.exists()  # no toolchain probe on either path


def test_a_fresh_build_records_the_answer_its_rerun_gives(home, tmp_path):
    """A real build (real cmake and compiler; a small tree standing in for llama.cpp, placed
    where the store keeps the locked source): the very next run is already replayed, and
    answers what the full command answers."""
    config, lock = project(tmp_path)
    b = LlamaCppBuild(Request(targets=("llama-cli",)), config=config, lock=lock)
    src = store_path(b.entry, home)
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(TINY_CMAKE)
    (src / "util.c").write_text("int util(void) { return 42; }\n")
    (src / "cli.c").write_text("int util(void);\nint main(void) { return util() - 42; }\n")
    env = {"PYLMSERV_HOME": str(home), "CCACHE_DISABLE": "1"}
    args = ["--config", config, "--lock", lock, "build", "--target", "llama-cli", "-j", "1", "--json"]
    rc, out, err, replayed = pylmserv(*args, env=env)
    assert rc == 0 and not replayed and json.loads(out)["cache_hit"] is False, err
    rc, out, err, replayed = pylmserv(*args, env=env)
    assert rc == 0 and replayed, err
    answer = json.loads(out)
    assert answer["cache_hit"] is True and answer["notes"] == ["up to date: nothing to do"]
    assert subprocess.run([answer["paths"]["llama-cli"]], timeout=30).returncode == 0
    for record in (home / replay.DIR).glob("*.json"):
        record.unlink()
    rc, out, err, replayed = pylmserv(*args, env=env)  # the full command again
    assert rc == 0 and not replayed, err
    full = json.loads(out)
    assert {k: v for k, v in full.items() if k != "seconds"} == {k: v for k, v in answer.items() if k != "seconds"}


def test_replay_reinstalls_what_was_removed(stamped, home):
    b, args, env, _ = stamped
    pylmserv(*args, env=env)
    installed = home / "bin" / "llama.cpp-cpu" / b.key / "llama-cli"
    current = home / "bin" / "llama.cpp-cpu" / "current"
    installed.unlink()
    current.unlink()
    rc, _, err, replayed = pylmserv(*args, env=env)
    assert rc == 0 and replayed, err
    assert installed.read_text() == "#!/bin/sh\necho stand-in llama-cli\n"
    assert os.readlink(current) == b.key


def test_same_bytes_rewritten_config_or_lock_is_still_replayed_but_new_content_is_not(stamped):
    b, args, env, _ = stamped
    config, lock = Path(args[1]), Path(args[3])
    pylmserv(*args, env=env)
    lock.write_bytes(lock.read_bytes())  # new mtime, same content
    assert pylmserv(*args, env=env)[3]
    for path in (config, lock):
        path.write_text(path.read_text() + "\n# a comment\n")
        rc, _, err, replayed = pylmserv(*args, env=env)
        assert rc == 0 and not replayed and "up to date" in err  # the full command, same answer
        assert pylmserv(*args, env=env)[3]  # and recorded again


def test_a_new_lock_pin_is_built_not_replayed(stamped, tmp_path):
    b, args, env, marker = stamped
    pylmserv(*args, env=env)
    lock = Path(args[3])
    lock.write_text(lock.read_text().replace('rev = "b9941"', 'rev = "b9990"'))
    rc, _, err, replayed = pylmserv(*args, env=env)
    # another pin is another build: it goes on to fetch the (unreachable) source
    assert not replayed and rc == 3 and "never-fetched.tar.gz" in err


@pytest.mark.parametrize("change", ["output", "stamp", "stamp-key"])
def test_a_changed_build_is_not_replayed(stamped, change):
    b, args, env, marker = stamped
    pylmserv(*args, env=env)
    if change == "output":
        (b.build_dir / "bin" / "llama-cli").write_text("#!/bin/sh\necho changed\n")
    elif change == "stamp":
        b.stamp_path.unlink()
    else:  # the same build dir stamped by other inputs
        st = stamps.read_stamp(b.stamp_path)
        stamps.write_stamp(b.stamp_path, stamps.make_stamp(dict(b.inputs, rev="other"), st.output_paths()))
    rc, _, err, replayed = pylmserv(*args, env=env)
    assert not replayed and rc == 3 and "never-fetched.tar.gz" in err  # rebuilt: fetch of the source


def test_headers_installed_after_the_record_are_looked_at_again(stamped, tmp_path):
    """A stat-only detection (OpenSSL headers: LLAMA_OPENSSL) is re-run before replaying:
    headers that appear are seen as on the full path (which then decides: another build
    where there were none, the same one where the system already has them)."""
    b, args, env, marker = stamped
    ssl_root = tmp_path / "openssl"
    env = dict(env, OPENSSL_ROOT_DIR=str(ssl_root))
    b2 = LlamaCppBuild(Request(targets=TARGETS), config=Path(args[1]), lock=Path(args[3]))
    assert b2.key == b.key  # an empty OPENSSL_ROOT_DIR changes nothing yet
    pylmserv(*args, env=env)
    assert pylmserv(*args, env=env)[3]
    (ssl_root / "include" / "openssl").mkdir(parents=True)
    (ssl_root / "include" / "openssl" / "ssl.h").write_text("/* stand-in header */\n")
    rc, _, err, replayed = pylmserv(*args, env=env)
    assert not replayed
    if b.detected.openssl:  # this machine has them anyway: same key, up to date
        assert rc == 0 and "up to date" in err
    else:  # LLAMA_OPENSSL=ON now: another build, which fetches the (unreachable) source
        assert rc == 3 and "never-fetched.tar.gz" in err


def test_any_environment_change_is_a_new_invocation(stamped):
    b, args, env, _ = stamped
    pylmserv(*args, env=env)
    assert pylmserv(*args, env=env)[3]
    assert not pylmserv(*args, env=dict(env, CC="clang"))[3]
    assert not pylmserv(*args, env=dict(env, SOURCE_DATE_EPOCH="1"))[3]
    assert pylmserv(*args, env=dict(env, OLDPWD="/elsewhere"))[3]  # shell bookkeeping is not an input


@pytest.mark.parametrize("extra", [["--force"], ["-v"], ["--dry-run"], ["--source", "SRC"]])
def test_what_is_never_replayed(stamped, tmp_path, extra):
    b, args, env, marker = stamped
    if extra == ["--source", "SRC"]:
        src = tmp_path / "src"
        src.mkdir()
        (src / "CMakeLists.txt").write_text("project(x)\n")
        extra = ["--source", src]
    args = (args[:4] + ["-v"] + args[4:]) if extra == ["-v"] else args + extra
    for _ in range(2):
        assert not pylmserv(*args, env=env)[3]


def test_gpu_and_auto_builds_are_not_replayable(home, tmp_path):
    """Their keys come from probes that run tools (nvidia-smi, rocminfo, nvcc)."""
    config, lock = project(tmp_path)
    for req in (Request(backend="cuda", cuda_arch="90"), Request(backend="rocm", gpu_targets="gfx1100")):
        assert LlamaCppBuild(req, config=config, lock=lock).replay_checks() is None
    cpu = LlamaCppBuild(Request(), config=config, lock=lock).replay_checks()
    assert set(cpu) == {"files", "probed", "lock"} and str(lock.resolve()) in cpu["files"]


def test_a_damaged_record_is_ignored_and_rewritten(stamped, home):
    b, args, env, _ = stamped
    pylmserv(*args, env=env)
    record = next((home / replay.DIR).glob("*.json"))
    for garbage in ("", "{", "[]", '{"version": 1}', json.dumps({**json.loads(record.read_text()), "stamp": 5})):
        record.write_text(garbage)
        rc, _, err, replayed = pylmserv(*args, env=env)
        assert rc == 0 and not replayed and "up to date" in err
    assert pylmserv(*args, env=env)[3]


def test_a_record_made_for_other_arguments_is_not_used(stamped, home):
    """Records are found by a hash of the invocation and also carry it: a record copied under
    another invocation's name (a hash collision, a hand edit) is not taken."""
    b, args, env, _ = stamped
    pylmserv(*args, env=env)
    other = args[:-2]  # only llama-cli: a different build
    pylmserv(*other, env=env)  # not stamped: fails to fetch, records nothing
    record = next((home / replay.DIR).glob("*.json"))
    doc = json.loads(record.read_text())
    env_key = dict(os.environ, PYTHONPATH=str(REPO), **env)
    assert len(list((home / replay.DIR).glob("*.json"))) == 1
    assert doc["argv"] == list(map(str, args))  # what the record is for
    # make `other` find it: the file named after `other`'s invocation holds `args`' record
    fake = subprocess.run([sys.executable, "-c", "import sys, os; from pylmserv.store import replay; "
                           "print(replay.invocation_key(sys.argv[1:]))", *map(str, other)],
                          capture_output=True, text=True, env=env_key, check=True).stdout.strip()
    (home / replay.DIR / f"{fake}.json").write_text(record.read_text())
    rc, _, err, replayed = pylmserv(*other, env=env)
    assert not replayed and rc == 3  # the full command: llama-cli alone is not built


def test_gc_forgets_records_of_deleted_builds(stamped, home):
    b, args, env, _ = stamped
    pylmserv(*args, env=env)
    assert len(list((home / replay.DIR).glob("*.json"))) == 1
    gc.sweep(home, gc.Keep(), dry_run=True)
    assert len(list((home / replay.DIR).glob("*.json"))) == 1  # a dry run deletes nothing
    import shutil

    shutil.rmtree(b.build_dir)
    gc.sweep(home, gc.Keep())
    assert list((home / replay.DIR).glob("*.json")) == []
