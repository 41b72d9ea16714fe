"""Reproducible llama.cpp builds: the option mapping (fast), and the proof (slow): the real
llama.cpp source (vendored in the llama-cpp-python sdist, served on loopback) built by
`pylmserv build --reproducible` in two PYLMSERV_HOMEs with different path lengths gives
bit-identical binaries, whose sha256 the build's JSON records.

One of the two is the test session's own home (llama_source.PERSISTENT_HOME, where the
session's llama.cpp build already unpacked the source, with its ccache): its paths are the
same in every run, so after the first run that side is a stamp hit, or ccache hits made
from a real compile of the same command line. The other home is new in every run and
built cold without ccache, so every run compares a fresh compile against the stable one."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.builders.llama_cpp import (MAPPED_BUILD, MAPPED_SOURCE, SOURCE_DATE_EPOCH, Detected, Request,
                                         SourceFeatures, _CURRENT, make_commands, map_options)
from tests.support import llama_source

FEATURES = SourceFeatures(_CURRENT, "test")
LINUX = Detected(platform="linux")


def test_mapping_fixes_paths_time_archives_and_build_id():
    on = map_options(Request(reproducible=True), FEATURES, LINUX)
    off = map_options(Request(), FEATURES, LINUX)
    env = dict(on.env)
    assert env["SOURCE_DATE_EPOCH"] == os.environ.get("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
    assert env["CCACHE_BASEDIR"] == ""
    d = on.as_dict()
    assert "qcD" in d["CMAKE_C_ARCHIVE_CREATE"] and d["CMAKE_CXX_ARCHIVE_FINISH"].endswith("-D <TARGET>")
    assert d["CMAKE_EXE_LINKER_FLAGS"] == "-Wl,--build-id=sha1" and d["CMAKE_BUILD_RPATH_USE_ORIGIN"] == "ON"
    assert not any(k.startswith(("CMAKE_C_ARCHIVE", "CMAKE_EXE_LINKER")) for k in off.as_dict()) and not off.env
    src, build = Path("/h/sources/x-llama-cpp"), Path("/h/builds/llama.cpp-cpu-k")
    argv = make_commands("cmake", None, src, build, on, ["llama-cli"], 2, "/usr/bin/ccache", "cpu").configure
    flags = next(a for a in argv if a.startswith("-DCMAKE_CXX_FLAGS="))
    assert f"-ffile-prefix-map={src}={MAPPED_SOURCE}" in flags and f"-ffile-prefix-map={build}={MAPPED_BUILD}" in flags
    user = map_options(Request(reproducible=True, cmake_args=("-DCMAKE_C_FLAGS=-O2",)), FEATURES, LINUX)
    argv = make_commands("cmake", None, src, build, user, ["llama-cli"], 2, None, "cpu").configure
    assert next(a for a in argv if a.startswith("-DCMAKE_C_FLAGS=")).startswith("-DCMAKE_C_FLAGS=-O2 -ffile-prefix-map=")
    plain = make_commands("cmake", None, src, build, off, ["llama-cli"], 2, None, "cpu").configure
    assert not any("file-prefix-map" in a for a in plain)


def test_portable_defaults_to_reproducible_and_keys_differ(tmp_path, monkeypatch):
    monkeypatch.setenv("PYLMSERV_HOME", str(tmp_path / "home"))
    from pylmserv.builders import build

    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text("option(GGML_NATIVE \"\" ON)\noption(LLAMA_BUILD_TESTS \"\" ON)\n")
    keys = {}
    for label, kw in (("plain", {}), ("repro", {"reproducible": True}), ("portable", {"portable": True}),
                      ("portable-off", {"portable": True, "reproducible": False})):
        result = build(source_dir=src, dry_run=True, **kw)
        keys[label] = result.key
        assert ("SOURCE_DATE_EPOCH=" in result.commands[0]) == (label in ("repro", "portable"))
    assert len(set(keys.values())) == 4


@pytest.mark.slow
def test_two_homes_build_bit_identical_binaries(tmp_path):
    llama_source.require_sdist()
    fresh = tmp_path / "a-much-longer-directory-name" / "home-number-two"
    homes = [llama_source.PERSISTENT_HOME, fresh]
    assert len(str(homes[0])) != len(str(homes[1]))
    # the session's home, its ccache on; a new home, cold (no ccache: nothing cached hides a difference)
    envs = [llama_source.build_env(), dict(llama_source.build_env(), PYLMSERV_HOME=str(fresh), CCACHE_DISABLE="1")]
    results = []
    # The session's build is the session home's `current` (list, serve and pack tests read it):
    # this build installs over it, so it is put back afterwards.
    current = llama_source.PERSISTENT_HOME / "bin" / "llama.cpp-cpu" / "current"
    before = os.readlink(current) if current.is_symlink() else None
    try:
        with llama_source.served_project(tmp_path / "w") as (config, lock, _):
            for env in envs:
                argv = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock), "build",
                        "--json", "--reproducible", "-j", os.environ.get("PYLMSERV_TEST_JOBS", "2"),
                        "--target", "llama-gguf", "--cmake-arg", "-DLLAMA_BUILD_EXAMPLES=ON"]
                proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
                assert proc.returncode == 0, proc.stderr[-4000:]
                results.append(json.loads(proc.stdout))
    finally:
        if before is not None and (not current.is_symlink() or os.readlink(current) != before):
            tmp_link = current.with_name("current.test-restore")
            if tmp_link.is_symlink():
                tmp_link.unlink()
            tmp_link.symlink_to(before)
            os.replace(tmp_link, current)
    a, b = results
    assert a["build_dir"] != b["build_dir"] and not b["cache_hit"]  # the new home really compiled
    assert a["key"] == b["key"]  # same lock and options: the same build, whatever the home
    binaries = [Path(r["paths"]["llama-gguf"]) for r in results]
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in binaries]
    assert digests[0] == digests[1], "the two builds differ"
    assert a["sha256"]["llama-gguf"] == b["sha256"]["llama-gguf"] == digests[0]
    data = binaries[0].read_bytes()
    assert MAPPED_SOURCE.encode() in data  # __FILE__ of GGML_ASSERT: mapped...
    for home in homes:
        assert str(home).encode() not in data and str(home.parent).encode() not in data  # ...never the real path
