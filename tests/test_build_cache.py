"""Shared builds: a portable build pushed (signed) from one store is substituted by another
store over HTTP, sha256-identical, only under a trusted key; refused for a bad signature, an
untrusted key or tampered bytes (nothing installed), and `--no-build` never compiles.

The build is real but small: tests/data/tiny-llama is a stand-in llama.cpp source tree (the
same CMake switches, a shared libggml that dlopens a CPU-variant module beside the binary),
locked and served on 127.0.0.1 like the real source, built by real cmake and cc through the
normal `pylmserv build --portable` path. test_real_llama_cpp_portable_round_trip (slow) does
the same with the real llama.cpp tree.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pylmserv.core.nar import hash_path
from pylmserv.core.signing import SecretKey
from pylmserv.pins.config import Lock, LockEntry
from tests.support.httpserver import serve_directory

TREE = Path(__file__).parent / "data" / "tiny-llama"
TARGETS = ("--target", "llama-cli", "--target", "llama-server")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def world(tmp_path):
    """A project locking the tiny stand-in source served on loopback, a signing key, a cache dir
    served over HTTP; yields a namespace of paths and helpers."""
    www = tmp_path / "www"
    www.mkdir()
    src = tmp_path / "tiny-llama"
    shutil.copytree(TREE, src)
    with tarfile.open(www / "tiny-llama.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="tiny-llama")
    cache = tmp_path / "cache"
    cache.mkdir()
    key_file = tmp_path / "team.sk"
    key_file.write_text(SecretKey.generate("team-cache-1").to_text())
    with serve_directory(www) as base, serve_directory(cache) as cache_url:
        proj = tmp_path / "project"
        proj.mkdir()
        url = f"{base}/tiny-llama.tar.gz"
        (proj / "pylmserv.toml").write_text(f'[sources.llama-cpp]\ntype = "url"\nurl = "{url}"\nunpack = true\n'
                                            'version = "tiny-1"\n')
        Lock(path=proj / "pylmserv.lock").with_entry(LockEntry(
            "sources", "llama-cpp", url, hash_path(src, "nar"), "nar", rev="tiny-1",
            extra={"type": "url", "unpack": True, "version": "tiny-1"})).write()

        class W:
            pass

        w = W()
        w.tmp, w.proj, w.cache, w.cache_url, w.key_file = tmp_path, proj, cache, cache_url, key_file
        w.public = str(SecretKey.read(key_file).public)

        def cli(home, *args, env=None):
            """`pylmserv` with its own home; env values of None unset a variable."""
            e = dict(os.environ)
            for k in ("SOURCE_DATE_EPOCH", "PYLMSERV_SUBSTITUTERS", "PYLMSERV_TRUSTED_KEYS"):
                e.pop(k, None)
            e.update({"PYLMSERV_HOME": str(tmp_path / home), "CCACHE_DISABLE": "1"})
            e.update(env or {})
            e = {k: v for k, v in e.items() if v is not None}
            argv = [sys.executable, "-m", "pylmserv", "--config", str(proj / "pylmserv.toml"),
                    "--lock", str(proj / "pylmserv.lock"), *map(str, args)]
            return subprocess.run(argv, capture_output=True, text=True, env=e, timeout=600)

        w.cli = cli
        yield w


def build_and_push(w):
    built = w.cli("builder", "build", "--portable", "--json", "-j", "2", *TARGETS)
    assert built.returncode == 0, built.stderr
    data = json.loads(built.stdout)
    assert data["cache_hit"] is False
    pushed = w.cli("builder", "push", "llama.cpp", "--to", w.cache, "--sign-key", w.key_file, "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert w.key_file.read_text() not in pushed.stdout + pushed.stderr  # the secret is never printed
    (manifest,) = json.loads(pushed.stdout)["pushed"]
    return data, manifest


def no_compilers(w) -> dict:
    """PATH with cmake/ninja/cc/c++ that record being run and fail: proof nothing compiles."""
    tools = w.tmp / "no-compilers"
    tools.mkdir(exist_ok=True)
    marker = w.tmp / "compiler-ran"
    for name in ("cmake", "ninja", "cc", "c++", "gcc", "g++"):
        p = tools / name
        p.write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{marker}'\nexit 1\n")
        p.chmod(0o755)
    return {"PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}, marker


def installed(home: Path) -> Path:
    return home / "bin" / "llama.cpp-cpu" / "current"


def test_pushed_build_is_substituted_identical_and_runs(world):
    w = world
    built, manifest = build_and_push(w)
    assert manifest["signatures"][0].startswith("team-cache-1:")
    shipped = set(manifest["files"])
    assert {"llama-cli", "llama-server", "libggml.so", "libggml.so.0", "libggml.so.0.1.2", "libggml-cpu-generic.so",
            "libggml-cpu-x86-64-v3.so"} <= shipped
    # the versioned names of one library are one blob in the cache
    assert len(list((w.cache / "sha256").iterdir())) == len(set(manifest["files"].values())) == len(shipped) - 2
    env, marker = no_compilers(w)
    env.update({"PYLMSERV_SUBSTITUTERS": w.cache_url, "PYLMSERV_TRUSTED_KEYS": w.public})
    got = w.cli("user", "build", "--portable", "--no-build", "--json", *TARGETS, env=env)
    assert got.returncode == 0, got.stderr
    assert not marker.exists()  # nothing compiled, no toolchain run
    data = json.loads(got.stdout)
    assert "substituted from" in got.stderr and "signed by team-cache-1" in got.stderr
    assert data["key"] == built["key"]  # the same local build key: stamps and `current` as for a build
    cur = installed(w.tmp / "user")
    builder_bin = w.tmp / "builder" / "bin" / "llama.cpp-cpu" / "current"
    for name in shipped:
        assert sha256(cur / name) == sha256(builder_bin / name) == manifest["files"][name]
    # the substitute runs from its install dir and loads its CPU module beside it ($ORIGIN)
    out = subprocess.run([str(cur / "llama-cli")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "llama-cli: cpu-generic", out
    # and is an up-to-date build from now on: no substituter asked, no compiler run
    again = w.cli("user", "build", "--portable", "--no-build", "--json", *TARGETS,
                  env={**env, "PYLMSERV_SUBSTITUTERS": "http://127.0.0.1:9"})
    assert again.returncode == 0 and json.loads(again.stdout)["cache_hit"] is True, again.stderr
    assert not marker.exists()


def test_untrusted_key_refused_nothing_installed_no_build_fails(world):
    w = world
    build_and_push(w)
    other = SecretKey.generate("someone-else-1")
    env, marker = no_compilers(w)
    env.update({"PYLMSERV_SUBSTITUTERS": w.cache_url, "PYLMSERV_TRUSTED_KEYS": str(other.public)})
    got = w.cli("user", "build", "--portable", "--no-build", *TARGETS, env=env)
    assert got.returncode == 6, got.stderr
    assert "refused build" in got.stderr and "untrusted key team-cache-1" in got.stderr
    assert "--no-build forbids compiling" in got.stderr and "Traceback" not in got.stderr
    assert not marker.exists()
    assert not installed(w.tmp / "user").exists()
    assert not list((w.tmp / "user" / "builds").glob("*/bin/*"))
    # same name, another key: a bad signature, not an untrusted name
    impostor = SecretKey.generate("team-cache-1")
    env["PYLMSERV_TRUSTED_KEYS"] = str(impostor.public)
    got = w.cli("user", "build", "--portable", "--no-build", *TARGETS, env=env)
    assert got.returncode == 6 and "bad signature by team-cache-1" in got.stderr, got.stderr


def test_tampered_bytes_refused_then_the_build_proceeds(world):
    w = world
    _, manifest = build_and_push(w)
    blob = w.cache / "sha256" / manifest["files"]["libggml.so"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))  # the registry/server now serves other bytes under the same name
    env = {"PYLMSERV_SUBSTITUTERS": w.cache_url, "PYLMSERV_TRUSTED_KEYS": w.public}
    nb_env, marker = no_compilers(w)
    got = w.cli("user", "build", "--portable", "--no-build", *TARGETS, env={**env, **nb_env})
    assert got.returncode == 6, got.stderr
    assert "libggml.so" in got.stderr and "bytes do not match the signed sha256" in got.stderr
    assert not installed(w.tmp / "user").exists() and not marker.exists()
    # without --no-build: refused, then compiled here
    got = w.cli("user", "build", "--portable", "--json", "-j", "2", *TARGETS, env=env)
    assert got.returncode == 0, got.stderr
    assert "bytes do not match" in got.stderr and "substituted" not in json.dumps(json.loads(got.stdout)["notes"])
    assert (installed(w.tmp / "user") / "llama-cli").is_file()


def test_rewritten_manifest_is_a_bad_signature(world):
    """A server that rewrites the manifest to name its own bytes breaks the signature."""
    w = world
    _, pushed = build_and_push(w)
    (path,) = (w.cache / "pylmserv-builds").glob("*.json")
    doc = json.loads(path.read_text())
    evil = w.cache / "sha256" / ("e" * 64)
    evil.write_bytes(b"#!/bin/sh\necho owned\n")
    for f in doc["files"]:
        if f["name"] == "llama-cli":
            f["sha256"], f["size"] = "e" * 64, evil.stat().st_size
    path.write_text(json.dumps(doc))
    env, marker = no_compilers(w)
    env.update({"PYLMSERV_SUBSTITUTERS": w.cache_url, "PYLMSERV_TRUSTED_KEYS": w.public})
    got = w.cli("user", "build", "--portable", "--no-build", *TARGETS, env=env)
    assert got.returncode == 6 and "bad signature by team-cache-1" in got.stderr, got.stderr
    assert not installed(w.tmp / "user").exists()


def test_config_cache_table_and_other_build_keys(world):
    """[cache] in pylmserv.toml works like the environment; a build with other options is
    another key (not substituted); a native build never asks a substituter."""
    w = world
    build_and_push(w)
    config = w.proj / "pylmserv.toml"
    config.write_text(config.read_text() + f'\n[cache]\nsubstituters = ["{w.cache_url}"]\n'
                                           f'trusted-public-keys = ["{w.public}"]\n')
    e, marker = no_compilers(w)
    got = w.cli("user", "build", "--portable", "--no-build", *TARGETS, env=e)
    assert got.returncode == 0 and "substituted from" in got.stderr, got.stderr
    other = w.cli("user2", "build", "--portable", "--no-build", "--target", "llama-cli", env=e)
    assert other.returncode == 6 and "no trusted substitute" in other.stderr
    native = w.cli("user3", "build", "--no-build", *TARGETS, env=e)
    assert native.returncode == 2 and "--portable" in native.stderr
    assert not marker.exists()
    config.write_text(config.read_text().replace(w.public, "team-cache-1:bm90IGEga2V5"))
    bad = w.cli("user4", "build", "--portable", "--dry-run")
    assert bad.returncode == 2 and "[cache] trusted-public-keys" in bad.stderr, bad.stderr


@pytest.mark.slow
def test_real_llama_cpp_portable_round_trip(tmp_path):
    """The real llama.cpp tree (vendored in the llama-cpp-python sdist, served on loopback):
    `build --portable` in one home (GGML_BACKEND_DL, every CPU variant), `push` to a cache dir
    served over HTTP, `build --portable --no-build` in a second home: the same bytes, no
    compiler run, and the substituted llama-cli runs. The times go to stdout (pytest -s):
    docs/sharing.md quotes them; nothing here asserts on time."""
    import time

    from tests.support import llama_source

    llama_source.require_sdist()
    key = SecretKey.generate("team-cache-1")
    key_file = tmp_path / "team.sk"
    key_file.write_text(key.to_text())
    cache = tmp_path / "cache"
    cache.mkdir()
    with llama_source.served_project(tmp_path) as (config, lock, _), serve_directory(cache) as cache_url:
        builder = llama_source.build_env({"PYLMSERV_HOME": str(tmp_path / "builder")})
        t0 = time.monotonic()
        proc = llama_source.run_build(config, lock, "--portable", env=builder, timeout=4 * 3600)
        cold = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-4000:]
        built = json.loads(proc.stdout)
        push = subprocess.run([sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock), "push",
                               "llama.cpp", "--to", str(cache), "--sign-key", str(key_file), "--json"],
                              capture_output=True, text=True, env=builder, timeout=600)
        assert push.returncode == 0, push.stderr
        (manifest,) = json.loads(push.stdout)["pushed"]
        assert any(name.startswith("libggml-cpu-") for name in manifest["files"])  # the CPU variants ship
        user_home = tmp_path / "user"
        tools = tmp_path / "no-compilers"
        tools.mkdir()
        marker = tmp_path / "compiler-ran"
        for name in ("cmake", "ninja", "cc", "c++", "gcc", "g++"):
            (tools / name).write_text(f"#!/bin/sh\necho {name} >> '{marker}'\nexit 1\n")
            (tools / name).chmod(0o755)
        user = llama_source.build_env({"PYLMSERV_HOME": str(user_home), "PYLMSERV_SUBSTITUTERS": cache_url,
                                       "PYLMSERV_TRUSTED_KEYS": str(key.public),
                                       "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"})
        t0 = time.monotonic()
        proc = llama_source.run_build(config, lock, "--portable", "--no-build", env=user, timeout=600)
        subst = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert not marker.exists() and "substituted from" in proc.stderr
        got = json.loads(proc.stdout)
        assert got["sha256"] == built["sha256"] == manifest["files"]
        cli = Path(got["paths"]["llama-cli"])
        out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        size = sum(Path(cli.parent / n).stat().st_size for n in manifest["files"])
        print(f"\nbuild cache timing: cold portable build {cold:.1f} s; substitution {subst:.1f} s "
              f"({len(manifest['files'])} files, {size / 1e6:.1f} MB)")


def test_cache_key_drops_host_only_bits_and_needs_portable_locked_source():
    from pylmserv.builders.llama_cpp import portable_cache_inputs
    from pylmserv.builders.substitute import cache_key

    inputs = {"engine": "llama.cpp", "mapping": 2, "source": "sha256-AAAA", "rev": "b1", "backend": "cuda",
              "targets": ["llama-cli"], "portable": True, "platform": "linux-x86_64", "cmake_args": [],
              "detected": {"openssl": True, "cuda_archs": [], "nvcc_archs": ["90"],
                           "cublas_wheel": ["/home/alice/venv/nvidia/cu13/lib/libcublas.so.13", "/home/alice/inc"]}}
    alice = portable_cache_inputs(inputs, "glibc")
    bob_inputs = json.loads(json.dumps(inputs))
    bob_inputs["detected"]["cublas_wheel"] = ["/opt/bob/nvidia/cu13/lib/libcublas.so.13", "/opt/bob/inc"]
    bob = portable_cache_inputs(bob_inputs, "glibc")
    assert cache_key(alice) == cache_key(bob) and "alice" not in json.dumps(alice)
    assert alice["detected"]["cublas_wheel"] == "libcublas.so.13"
    # what decides the result changes the key
    for change in ({"backend": "cpu"}, {"source": "sha256-BBBB"}, {"platform": "linux-aarch64"},
                   {"cmake_args": ["-DGGML_CUDA_F16=ON"]}, {"targets": ["llama-cli", "llama-server"]}):
        assert cache_key(portable_cache_inputs({**inputs, **change}, "glibc")) != cache_key(alice), change
    assert cache_key(portable_cache_inputs(inputs, "musl")) != cache_key(alice)
    # native builds and local trees are never shared
    assert portable_cache_inputs({**inputs, "portable": False}, "glibc") is None
    assert portable_cache_inputs({**inputs, "source": "path:/home/alice/llama.cpp"}, "glibc") is None


def test_newer_glibc_than_the_host_is_refused():
    from pylmserv.builders.substitute import check_libc, libc
    from pylmserv.core.errors import VerificationError

    family, version = libc()
    if family != "glibc":
        pytest.skip("not a glibc host")
    check_libc({"built_with": {"libc": ["glibc", version]}})
    check_libc({"built_with": {"libc": ["glibc", "2.17"]}})
    with pytest.raises(VerificationError, match="newer than this host"):
        check_libc({"built_with": {"libc": ["glibc", "99.0"]}})


def test_push_without_a_portable_build_or_key_is_one_clear_line(world):
    w = world
    nothing = w.cli("builder", "push", "llama.cpp", "--to", w.cache, "--sign-key", w.key_file)
    assert nothing.returncode == 2 and "no portable llama.cpp build" in nothing.stderr, nothing.stderr
    missing = w.cli("builder", "push", "llama.cpp", "--to", w.cache, "--sign-key", w.tmp / "nope.sk")
    assert missing.returncode == 2 and "cannot read the secret key file" in missing.stderr
    (w.tmp / "bad.sk").write_text("team:" + "A" * 10)
    bad = w.cli("builder", "push", "llama.cpp", "--to", w.cache, "--sign-key", w.tmp / "bad.sk")
    assert bad.returncode == 2 and "secret key" in bad.stderr and "AAAA" not in bad.stderr
    assert not list(w.cache.iterdir())
    assert "Traceback" not in nothing.stderr + missing.stderr + bad.stderr


def test_signed_manifest_with_hostile_entries_is_still_refused():
    """Even a trusted signer's manifest cannot name a file outside the build or lack a target."""
    from pylmserv.builders.substitute import cache_key, check_manifest, make_manifest, sign_manifest
    from pylmserv.core.errors import VerificationError

    key = SecretKey.generate("team-cache-1")
    inputs = {"portable": True}
    k = cache_key(inputs)

    def check(files, wanted=("llama-cli",), for_key=k):
        doc = sign_manifest(make_manifest(k, inputs, "llama.cpp", "cpu", files, {}), key)
        return check_manifest(json.dumps(doc).encode(), for_key, [key.public], wanted)

    good = {"name": "llama-cli", "sha256": "a" * 64, "size": 1, "target": "llama-cli", "executable": True}
    assert check([good])[1] == key.public
    for bad in ({**good, "name": "../llama-cli"}, {**good, "name": ".hidden"}, {**good, "size": -1},
                {**good, "target": ["x"]}, {**good, "sha256": "A" * 64}, {**good, "executable": "yes"}):
        with pytest.raises(VerificationError, match="bad file entry"):
            check([bad])
    with pytest.raises(VerificationError, match="lacks llama-server"):
        check([good], wanted=("llama-cli", "llama-server"))
    with pytest.raises(VerificationError, match="another build"):
        check([good], for_key="0" * 64)
    with pytest.raises(VerificationError, match="not JSON"):
        check_manifest(b"\xff", k, [key.public], ())


def test_cut_or_lying_server_is_a_refusal_line_and_the_build_goes_on(world, server):
    """A substituter that cuts every blob, serves an HTML page, or answers with an endless
    manifest: each is one refusal line (no traceback, nothing installed); --no-build then fails."""
    w = world
    _, manifest = build_and_push(w)
    for path in w.cache.rglob("*"):
        if path.is_file():
            server.add(str(path.relative_to(w.cache)), path.read_bytes())
    env, marker = no_compilers(w)
    env.update({"PYLMSERV_SUBSTITUTERS": f"{server.base} http://127.0.0.1:9", "PYLMSERV_TRUSTED_KEYS": w.public})
    server.faults.cut_at, server.faults.cut_times = 10000, 100  # the manifest (~2 KB) arrives, the binaries not
    got = w.cli("user", "build", "--portable", "--no-build", *TARGETS, env=env)
    assert got.returncode == 6 and "Traceback" not in got.stderr, got.stderr
    assert f"substituter {server.base}: refused build" in got.stderr and "Connection broken" in got.stderr
    assert "substituter http://127.0.0.1:9: refused build" in got.stderr  # unreachable: named too
    assert not installed(w.tmp / "user").exists() and not marker.exists()
    server.faults.cut_at, server.faults.cut_times = None, 0
    server.faults.html = True
    got = w.cli("user", "build", "--portable", "--no-build", *TARGETS, env=env)
    assert got.returncode == 6 and "not JSON" in got.stderr, got.stderr
    server.faults.html = False
    (key_path,) = [p for p in server.files if p.startswith("/pylmserv-builds/")]
    server.add(key_path, b"{" + b" " * (2 << 20))
    got = w.cli("user", "build", "--portable", "--no-build", *TARGETS, env=env)
    assert got.returncode == 6 and "refused unread" in got.stderr, got.stderr
    assert not installed(w.tmp / "user").exists()
