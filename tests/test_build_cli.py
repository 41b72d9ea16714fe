"""`pylmserv build` through the real CLI: dry runs, bad input, the up-to-date fast path,
failures (log kept, no stamp) and incremental reruns on a small real CMake tree."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pylmserv.builders import LlamaCppBuild
from pylmserv.store import layout
from pylmserv.store import records as stamps
from pylmserv.builders.llama_cpp import Request
from pylmserv.pins.config import Lock, LockEntry
from pylmserv.core.hashing import Hash
from tests.conftest import run_cli
from tests.support.tools import missing, require  # noqa: F401

FAKE_NAR = Hash.parse("sha256-/VS3L3/j1LdGRc3eRUJVAzEr3gRjlpGZRU8dO2yOdlY=")


def project(tmp_path: Path, url="http://127.0.0.1:9/never-fetched.tar.gz", with_source=True):
    d = tmp_path / "project"
    d.mkdir()
    config = d / "pylmserv.toml"
    lock = Lock(path=d / "pylmserv.lock")
    if with_source:
        config.write_text(f'[sources.llama-cpp]\ntype = "url"\nurl = "{url}"\nunpack = true\n')
        lock = lock.with_entry(LockEntry("sources", "llama-cpp", url, FAKE_NAR, "nar", rev="b9941",
                                         extra={"type": "url", "unpack": True}))
    else:
        config.write_text('[models.x]\nurl = "http://127.0.0.1:9/x.gguf"\n')
    lock.write()
    return config, lock.path


def recording_tool(bindir: Path, name: str, marker: Path) -> None:
    """A stand-in cmake/ninja that records that it was invoked, then fails."""
    bindir.mkdir(parents=True, exist_ok=True)
    p = bindir / name
    p.write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{marker}'\nexit 1\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def test_dry_run_prints_commands_and_detections_fetches_nothing(home, tmp_path):
    config, lock = project(tmp_path)
    proc = run_cli("--config", config, "--lock", lock, "build", "--dry-run", "--target", "llama-cli",
                   env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    configure, build = lines
    assert " -S " in configure and " -B " in configure
    for d in ("-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DCMAKE_BUILD_TYPE=Release"):
        assert d in configure
    assert "--build" in build and "--target llama-cli" in build
    assert "detected: cmake" in proc.stderr and "would fetch" in proc.stderr
    assert not (home / "sources").exists() or not any((home / "sources").iterdir())
    assert not (home / "builds").exists()


def test_dry_run_json_cuda_with_arch(home, tmp_path):
    config, lock = project(tmp_path)
    proc = run_cli("--config", config, "--lock", lock, "build", "--dry-run", "--json", "--backend", "cuda",
                   "--cuda-arch", "86", "--cmake-arg", "-DLLAMA_CUBLAS=ON", env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["dry_run"] is True and data["backend"] == "cuda"
    assert "-DGGML_CUDA=ON" in data["commands"][0] and "-DCMAKE_CUDA_ARCHITECTURES=86" in data["commands"][0]
    assert any("LLAMA_CUBLAS -> GGML_CUDA" in n for n in data["notes"])
    assert any(line.startswith("nvcc") for line in data["detected"])


@pytest.mark.parametrize("args,code,text", [
    (["--backend", "opencl"], 2, "Invalid value for '--backend'"),
    (["--jobs", "0"], 2, "--jobs"),
    (["--cmake-arg", "NOTADEFINE"], 2, "expected -DNAME=VALUE"),
    (["--backend", "metal"], 2, "metal backend needs macOS"),
    (["llamafile", "--target", "x"], 2, "apply to llama.cpp only"),
])
def test_bad_input_one_line_error(home, tmp_path, args, code, text):
    config, lock = project(tmp_path)
    proc = run_cli("--config", config, "--lock", lock, "build", "--dry-run", *args, env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == code, proc.stderr
    assert text in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_llama_cpp_in_lock(home, tmp_path):
    config, lock = project(tmp_path, with_source=False)
    proc = run_cli("--config", config, "--lock", lock, "build", env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2
    assert "no [sources.llama-cpp]" in proc.stderr and "pylmserv prefetch llama-cpp" in proc.stderr


def test_source_dir_without_cmakelists(home, tmp_path):
    proc = run_cli("build", "--source", tmp_path, env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2 and "no CMakeLists.txt" in proc.stderr


def standin_source(b: LlamaCppBuild) -> Path:
    """An (empty) tree where build `b`'s locked source lives in the store: an up-to-date build
    whose source is missing fetches it back first (builders/base.py `_restore_source`)."""
    path = layout.source_tree_path(b.entry.hash, b.entry.name, b.home)
    path.mkdir(parents=True, exist_ok=True)
    return path


def stamp_standin_build(b: LlamaCppBuild) -> dict:
    """Stamp build `b` as done with stand-in outputs (shell scripts; nothing compiles)."""
    (b.build_dir / "bin").mkdir(parents=True)
    outputs = {}
    for t in b.req.targets:
        p = b.build_dir / "bin" / t
        p.write_text(f"#!/bin/sh\necho stand-in {t}\n")
        p.chmod(0o755)
        outputs[t] = p
    stamps.write_stamp(b.stamp_path, stamps.make_stamp(b.inputs, outputs))
    return outputs


def test_up_to_date_fast_path_invokes_no_cmake_and_installs(home, tmp_path):
    """A stamped build (stand-in outputs) is returned as is: no cmake, no fetch, no compile."""
    config, lock = project(tmp_path)
    req = Request(targets=("llama-cli", "llama-server"))
    b = LlamaCppBuild(req, config=config, lock=lock)
    outputs = stamp_standin_build(b)
    source = standin_source(b)
    marker = tmp_path / "invoked"
    tools = tmp_path / "tools"
    for name in ("cmake", "ninja", "cc", "c++", "nvidia-smi"):
        recording_tool(tools, name, marker)
    env = {"PYLMSERV_HOME": str(home), "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}
    args = ("--config", config, "--lock", lock, "build", "--json", "--target", "llama-cli", "--target", "llama-server")
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["cache_hit"] is True and data["build_dir"] == str(b.build_dir)
    assert not marker.exists()
    cur = home / "bin" / "llama.cpp-cpu" / "current"
    assert cur.is_symlink() and os.readlink(cur) == b.key
    assert (cur / "llama-server").read_text() == "#!/bin/sh\necho stand-in llama-server\n"
    assert data["paths"]["llama-cli"] == str(home / "bin" / "llama.cpp-cpu" / b.key / "llama-cli")
    # another option set is another build: the stamp above does not satisfy it
    other = LlamaCppBuild(Request(targets=req.targets, portable=True), config=config, lock=lock)
    assert other.build_dir != b.build_dir
    # a touched output is no longer up to date
    outputs["llama-cli"].write_text("#!/bin/sh\necho changed\n")
    source.rmdir()  # never fetched, as the lock's URL says
    proc = run_cli(*args, "--prefix", tmp_path / "prefix", env=env)
    # not up to date any more: it went on to probe the toolchain and fetch the (unreachable) source
    assert marker.exists() and proc.returncode == 3, proc.stderr
    assert "http://127.0.0.1:9/never-fetched.tar.gz" in proc.stderr  # the fetch error names the URL
    assert not stamps.is_up_to_date(stamps.read_stamp(b.stamp_path), req.targets, inputs=b.inputs)


TINY_CMAKE = """cmake_minimum_required(VERSION 3.14)
project(standin_llama C)
option(LLAMA_BUILD_TESTS "" ON)
option(LLAMA_BUILD_EXAMPLES "" ON)
option(GGML_NATIVE "" OFF)
option(BUILD_SHARED_LIBS "" OFF)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_library(util STATIC util.c)
add_executable(llama-cli cli.c)
target_link_libraries(llama-cli util)
"""


def test_failure_keeps_log_no_stamp_then_rerun_is_incremental(home, tmp_path):
    """A small real CMake tree standing in for llama.cpp: real cmake, real compiler."""
    src = tmp_path / "standin-llama"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(TINY_CMAKE)
    (src / "util.c").write_text("int util(void) { return 42; }\n")
    (src / "cli.c").write_text("int util(void);\nint main(void) { return util() - 42 }\n")  # missing ';'
    env = {"PYLMSERV_HOME": str(home), "CCACHE_DISABLE": "1"}
    args = ("build", "--source", src, "--target", "llama-cli", "-j", "1", "--json")
    proc = run_cli(*args, env=env)
    assert proc.returncode == 6, proc.stderr
    assert "Traceback" not in proc.stderr
    (build_dir,) = (home / "builds").glob("llama.cpp-cpu-*[!k]")
    log = build_dir / "pylmserv-build.log"
    assert f"full log: {log}" in proc.stderr
    assert "error:" in proc.stderr and "cli.c" in proc.stderr
    assert log.is_file() and "cli.c" in log.read_text()
    assert not (build_dir / stamps.STAMP_NAME).exists()
    util_obj = next(build_dir.rglob("util.c.o"))
    before = util_obj.stat().st_mtime_ns

    (src / "cli.c").write_text("int util(void);\nint main(void) { return util() - 42; }\n")
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["build_dir"] == str(build_dir)
    assert util_obj.stat().st_mtime_ns == before  # continued: util.c was not compiled again
    assert (build_dir / stamps.STAMP_NAME).exists()
    installed = Path(data["paths"]["llama-cli"])
    assert os.access(installed, os.X_OK)
    import subprocess
    assert subprocess.run([str(installed)], timeout=30).returncode == 0


def test_step_timeout_kills_the_step_and_says_so(tmp_path):
    """A silent step past its timeout is stopped (with its children) and reported with the log path."""
    import time as _time

    from pylmserv.builders.llama_cpp import run_logged
    from pylmserv.core.errors import BuildError

    from pylmserv.builders.toolchain import detect_ninja

    ninja = detect_ninja()
    require(ninja.found, "ninja", "the [test] extra's ninja wheel, or apt-get install ninja-build")
    # a real ninja running a silent 30 s step: ninja must pass the stop on to its child
    (tmp_path / "build.ninja").write_text("rule slow\n  command = sleep 30 && touch $out\nbuild out: slow\n")
    log = tmp_path / "build.log"
    t0 = _time.monotonic()
    with pytest.raises(BuildError, match="timed out after 1 s") as err:
        run_logged([ninja.path, "-C", str(tmp_path)], log, dict(os.environ), 1, "build")
    assert _time.monotonic() - t0 < 15
    assert not (tmp_path / "out").exists()
    assert str(log) in err.value.message


def test_seed_compatible_build_llama_cpp_installs_under_output_dir(home, tmp_path):
    """build_llama_cpp(output_dir, cuda=False) still works: same build, binaries in output_dir/bin."""
    import pylmserv

    config, lock = project(tmp_path)
    req = Request()  # the default targets, as the seed built them
    b = LlamaCppBuild(req, config=config, lock=lock)
    (b.build_dir / "bin").mkdir(parents=True)
    outputs = {}
    for t in req.targets:
        outputs[t] = b.build_dir / "bin" / t
        outputs[t].write_text(f"stand-in {t}\n")
    stamps.write_stamp(b.stamp_path, stamps.make_stamp(b.inputs, outputs))
    standin_source(b)
    result = pylmserv.build_llama_cpp(tmp_path / "out", cuda=False, config=config, lock=lock)
    assert result.cache_hit and result.backend == "cpu"
    assert result.binaries == {t: tmp_path / "out" / "bin" / t for t in req.targets}
    assert (tmp_path / "out" / "bin" / "llama-server").read_text() == "stand-in llama-server\n"


def test_sigterm_to_pylmserv_stops_the_whole_configure_tree(home, tmp_path):
    """SIGTERM during configure: cmake and what it started (sh -> sleep) all stop, no stamp.
    (cmake does not forward signals: pylmserv stops the whole tree itself.)"""
    import signal
    import subprocess
    import sys
    import time as _time

    src = tmp_path / "standin-llama"
    src.mkdir()
    # a configure step that waits: the tree under `cmake` is cmake -> sh -> sleep
    (src / "CMakeLists.txt").write_text(TINY_CMAKE.replace(
        "project(standin_llama C)", "project(standin_llama C)\nexecute_process(COMMAND sh -c \"sleep 77; true\")"))
    (src / "util.c").write_text("int util(void) { return 42; }\n")
    (src / "cli.c").write_text("int main(void) { return 0; }\n")
    env = dict(os.environ, PYLMSERV_HOME=str(home), CCACHE_DISABLE="1")
    proc = subprocess.Popen([sys.executable, "-m", "pylmserv", "build", "--source", str(src), "--target", "llama-cli"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = _time.monotonic() + 60
        while _time.monotonic() < deadline and not _sleepers("77"):
            _time.sleep(0.2)
        assert _sleepers("77"), "configure never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    # pylmserv waits for the tree it stops; allow the kernel a bounded moment to reap it
    deadline = _time.monotonic() + 10
    while _sleepers("77") and _time.monotonic() < deadline:
        _time.sleep(0.05)
    assert not _sleepers("77")
    assert not any(home.glob("builds/*/pylmserv-stamp.json"))


def _sleepers(arg: str):
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                cmd = Path(f"/proc/{e}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[:2] == [b"sleep", arg.encode()]:
                out.append(int(e))
    return out
