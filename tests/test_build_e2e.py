"""End to end: the real llama.cpp source (vendored in the llama-cpp-python sdist), served
on 127.0.0.1 as the locked source, fetched + NAR-verified + built by `pylmserv build`,
then run on a tiny random-weight model. Slow (a cold CPU build); CI runs it.

PYLMSERV_HOME and CCACHE_DIR persist under ~/.cache/pylmserv-tests, so a rerun on the
same machine is a cache hit."""
from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support import llama_source
from tests.support.tinymodel import tiny_model


def generate(cli: Path, model: Path, prompt: str = "Hello", n: int = 8) -> str:
    proc = subprocess.run([str(cli), "-m", str(model), "-p", prompt, "-n", str(n), "-st", "--no-warmup",
                           "--temp", "0", "--seed", "1", "-t", "2", "-c", "256"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Generation:" in out, out[-2000:]
    m = re.search(r"> " + re.escape(prompt) + r"\n(.*?)\n\s*\[ Prompt:", out, re.S)
    assert m, out[-2000:]
    return m.group(1).strip()


@pytest.mark.slow
def test_build_llama_cpp_cpu_from_locked_source_and_run_tiny_model(tmp_path):
    result = llama_source.built_llama_cpp(tmp_path / "work")
    assert result["backend"] == "cpu"
    assert Path(result["build_dir"]).parent == llama_source.PERSISTENT_HOME / "builds"
    cli = Path(result["paths"]["llama-cli"])
    assert os.access(cli, os.X_OK) and os.access(result["paths"]["llama-server"], os.X_OK)
    current = llama_source.PERSISTENT_HOME / "bin" / "llama.cpp-cpu" / "current"
    assert current.resolve() == cli.parent.resolve()

    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0
    assert re.search(r"version: \S+ \(build \d+, commit vendored-0.3.36\)", version.stdout + version.stderr)

    source = llama_source.PERSISTENT_HOME / "sources" / f"{llama_source.tarball_nar_hash().nix32}-llama-cpp"
    assert (source / "CMakeLists.txt").is_file()  # the verified tree, stored by its NAR hash
    model = tiny_model(tmp_path, source)
    text = generate(cli, model)
    assert text, "no tokens generated"
    assert generate(cli, model) == text  # greedy decoding of a real forward pass is deterministic


@pytest.mark.slow
def test_second_build_is_a_no_op_without_cmake(tmp_path):
    llama_source.built_llama_cpp(tmp_path / "first")
    marker = tmp_path / "invoked"
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("cmake", "ninja", "cc", "c++", "gcc", "g++", "ccache"):
        p = tools / name
        p.write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{marker}'\nexit 1\n")
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    env = llama_source.build_env({"PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"})
    with llama_source.served_project(tmp_path / "again") as (config, lock, _):
        proc = llama_source.run_build(config, lock, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["cache_hit"] is True
    assert not marker.exists(), marker.read_text()


def test_served_source_not_matching_the_lock_is_refused(home, tmp_path):
    """The loopback server hands out a different (valid) tarball: hash mismatch, exit 4,
    nothing stored, nothing built."""
    llama_source.require_sdist()
    www = tmp_path / "bad"
    www.mkdir()
    buf = io.BytesIO(b"cmake_minimum_required(VERSION 3.14)\n")
    with tarfile.open(www / llama_source.TARBALL.name, "w:gz") as tf:
        info = tarfile.TarInfo(f"{llama_source.TOP}/CMakeLists.txt")
        info.size = len(buf.getvalue())
        tf.addfile(info, buf)
    from tests.support.httpserver import serve_directory

    with serve_directory(www) as base:
        config, lock = llama_source.write_project(tmp_path / "project", base)
        proc = run_cli("--config", config, "--lock", lock, "build", "-j", "2", env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 4, proc.stderr
    assert "hash mismatch" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((home / "sources").glob("*-llama-cpp"))
    assert not any(home.glob("builds/*/pylmserv-stamp.json"))
