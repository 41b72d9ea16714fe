"""The real llama.cpp source for tests: the tree vendored in the llama-cpp-python sdist,
repacked as a tarball with one top directory and served on 127.0.0.1 like any pinned
source, with a pylmserv.toml/lock pair that points at it.

Also `built_llama_cpp()`: one CPU build of llama-cli + llama-server through the normal
locked-source path, reused by every slow test of a session (the serve tests too). It
uses a persistent PYLMSERV_HOME and CCACHE_DIR under ~/.cache/pylmserv-tests so reruns
are a cache hit; a fresh CI machine builds cold (about 12 minutes on 2 cores).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

SDIST_VERSION = "0.3.36"
CACHE = Path(os.environ.get("PYLMSERV_TEST_CACHE", Path.home() / ".cache" / "pylmserv-tests"))
SDIST = CACHE / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
VENDOR_PREFIX = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
TOP = f"llama.cpp-vendored-{SDIST_VERSION}"
TARBALL = CACHE / f"{TOP}.tar.gz"
PERSISTENT_HOME = CACHE / "home"
CCACHE_DIR = CACHE / "ccache"
TEST_TARGETS = ("llama-cli", "llama-server")  # small on purpose: CI builds this cold
SOURCE_REV = f"vendored-{SDIST_VERSION}"


def have_sdist() -> bool:
    return SDIST.is_file()


def require_sdist():
    """Fail in CI (setup-dev.sh caches it), skip on a developer machine without it."""
    import pytest

    if not have_sdist():
        if os.environ.get("CI"):
            pytest.fail(f"{SDIST} missing: scripts/setup-dev.sh downloads it")
        pytest.skip(f"{SDIST} not cached (pip download --no-deps --no-binary llama-cpp-python llama-cpp-python=={SDIST_VERSION})")


def sdist_path(version: str = SDIST_VERSION) -> Path:
    return CACHE / f"llama_cpp_python-{version}.tar.gz"


def tarball_path(version: str = SDIST_VERSION) -> Path:
    return CACHE / f"llama.cpp-vendored-{version}.tar.gz"


def vendored_tarball(version: str = SDIST_VERSION) -> Path:
    """vendor/llama.cpp of the sdist as <TOP>/... in a .tar.gz (built once, then cached)."""
    tarball, prefix, top = tarball_path(version), f"llama_cpp_python-{version}/vendor/llama.cpp/", \
        f"llama.cpp-vendored-{version}"
    if tarball.is_file():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = tarball.with_name(f".{tarball.name}.{os.getpid()}.tmp")
    with tarfile.open(sdist_path(version), "r:gz") as src, tarfile.open(tmp, "w:gz", compresslevel=6) as dst:
        for member in src:
            if not member.name.startswith(prefix) or member.name == prefix:
                continue
            rel = member.name[len(prefix):]
            info = tarfile.TarInfo(f"{top}/{rel}")
            for attr in ("size", "mtime", "mode", "type", "linkname"):
                setattr(info, attr, getattr(member, attr))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            dst.addfile(info, src.extractfile(member) if member.isfile() else None)
    os.replace(tmp, tarball)
    return tarball


def tarball_nar_hash(version: str = SDIST_VERSION):
    """NAR hash of the unpacked tarball (Nix fetchzip semantics), cached beside it: unpacked
    by the standard library and hashed by `nix hash path`, never by pylmserv (the code under test)."""
    from pylmserv.core.errors import HashError
    from pylmserv.core.hashing import Hash, file_hash
    from tests.support import oracle

    tarball = vendored_tarball(version)
    flat = file_hash(tarball)
    sidecar = tarball.with_name(tarball.name + ".nar")
    if sidecar.is_file():
        try:
            flat_text, nar_text = sidecar.read_text().split()
            if flat_text == flat.sri and nar_text.startswith("nix:"):  # computed by Nix, not an older pylmserv one
                return Hash.parse(nar_text[len("nix:"):])
        except (ValueError, HashError):  # a sidecar in another format: hash again
            pass
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        got = oracle.nix_hash(oracle.unpack(tarball, Path(work) / "tree"))
    sidecar.write_text(f"{flat.sri} nix:{got.sri}\n")
    return got


def write_project(directory: Path, base_url: str, nar=None, version: str = SDIST_VERSION) -> Tuple[Path, Path]:
    """pylmserv.toml + pylmserv.lock in `directory` whose llama-cpp points at `base_url`."""
    from pylmserv.pins.config import Lock, LockEntry

    directory.mkdir(parents=True, exist_ok=True)
    url = f"{base_url.rstrip('/')}/{tarball_path(version).name}"
    rev = f"vendored-{version}"
    config = directory / "pylmserv.toml"
    config.write_text(f'[sources.llama-cpp]\ntype = "url"\nurl = "{url}"\nunpack = true\n'
                      f'version = "{rev}"\n')
    entry = LockEntry("sources", "llama-cpp", url, nar or tarball_nar_hash(version), "nar", rev=rev,
                      extra={"type": "url", "unpack": True, "version": rev})
    lock = Lock(path=directory / "pylmserv.lock").with_entry(entry)
    lock.write()
    return config, lock.path


@contextlib.contextmanager
def served_project(directory: Path, tarball: Optional[Path] = None,
                   version: str = SDIST_VERSION) -> Iterator[Tuple[Path, Path, str]]:
    """Serve the vendored tarball of llama-cpp-python `version` (or `tarball` under its
    name) on 127.0.0.1 and write a project pointing at it; yields (config, lock, base_url)."""
    from tests.support.httpserver import serve_directory

    www = directory / "www"
    www.mkdir(parents=True, exist_ok=True)
    nar = tarball_nar_hash(version)
    target = www / tarball_path(version).name
    if not target.exists():
        os.symlink(tarball or tarball_path(version), target)
    with serve_directory(www) as base:
        config, lock = write_project(directory / "project", base, nar, version)
        yield config, lock, base


def build_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"PYLMSERV_HOME": str(PERSISTENT_HOME), "CCACHE_DIR": str(CCACHE_DIR)})
    env.pop("SOURCE_DATE_EPOCH", None)
    env.update(extra or {})
    return env


def run_build(config: Path, lock: Path, *args: str, env: Optional[Dict[str, str]] = None,
              timeout: float = 3600) -> subprocess.CompletedProcess:
    """`pylmserv --config C --lock L build --json ...` as a user runs it (-j2: shared 2-core machines)."""
    argv = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock), "build", "--json",
            "-j", os.environ.get("PYLMSERV_TEST_JOBS", "2"), *args]
    for t in TEST_TARGETS:
        argv += ["--target", t]
    return subprocess.run(argv, capture_output=True, text=True, env=env or build_env(), timeout=timeout)


_BUILT: Dict[str, dict] = {}


def built_llama_cpp(workdir: Optional[Path] = None) -> dict:
    """A CPU llama.cpp (llama-cli + llama-server) built from the served vendored source.

    Returns the `--json` result (paths, build_dir, cache_hit, ...). Memoised per process,
    so every slow test of a session shares one build.
    """
    if "cpu" in _BUILT:
        return _BUILT["cpu"]
    require_sdist()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="pylmserv-llama-"))
    with served_project(workdir) as (config, lock, _):
        proc = run_build(config, lock)
    if proc.returncode != 0:
        raise AssertionError(f"pylmserv build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout)
    result["config"], result["lock"] = str(config), str(lock)
    _BUILT["cpu"] = result
    return result


def remove_tree(path: Path) -> None:
    def onerror(func, p, exc):
        os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onerror=onerror)
