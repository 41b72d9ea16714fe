"""State files in the home edited or replaced by an attacker or an unlucky user (issue 18):
a FIFO or a link to /dev/zero where a gc-root record, a manifest, a stamp or verify's record
is (commands hung forever or read without end), manifests of the wrong JSON type or naming
files outside the entry (`../`, absolute paths). Every command answers, and no path outside
the home is taken for a stored model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.core.fsutil import read_state_text
from tests.conftest import run_cli
from tests.test_adversarial_locks import _project

TIMEOUT = 60  # a hang is the failure: the commands answer within seconds


def cli(*args, cwd, home):
    env = dict(os.environ, PYLMSERV_HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    try:
        return subprocess.run([sys.executable, "-m", "pylmserv", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pylmserv {' '.join(map(str, args))} hung")


def plant(path: Path, kind: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        os.symlink("/dev/zero", path)


def test_read_state_text_refuses_fifo_link_device_and_huge(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/zero", tmp_path / "zero")
    (tmp_path / "big").write_bytes(b"x" * 2000)
    (tmp_path / "ok").write_text('{"a": 1}')
    for name in ("fifo", "zero"):
        with pytest.raises(OSError):
            read_state_text(tmp_path / name)
    with pytest.raises(OSError):
        read_state_text("/dev/zero")
    with pytest.raises(OSError):
        read_state_text(tmp_path / "big", limit=1000)
    assert read_state_text(tmp_path / "ok") == '{"a": 1}'


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_gc_and_doctor_answer_with_a_planted_root_record(kind, tmp_path, home):
    proj, _ = _project(tmp_path)
    cli("fetch", "m", cwd=proj, home=home)
    locks = home / "gcroots" / "locks"
    record = sorted(locks.iterdir())[0]
    plant(locks / ("0" * 32), kind)
    for args in (("gc", "--dry-run"), ("gc",), ("doctor",), ("fetch", "m")):
        proc = cli(*args, cwd=proj, home=home)
        assert "Traceback" not in proc.stderr, proc.stderr
    assert record.is_file()  # the real root is kept, and with it the model
    assert cli("fetch", "m", "--offline", cwd=proj, home=home).returncode == 0


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_planted_record_at_this_projects_own_key_does_not_hang_fetch(kind, tmp_path, home):
    proj, _ = _project(tmp_path)
    cli("fetch", "m", cwd=proj, home=home)
    record = sorted((home / "gcroots" / "locks").iterdir())[0]
    plant(record, kind)
    proc = cli("fetch", "m", cwd=proj, home=home)
    assert proc.returncode == 0, proc.stderr


def test_a_relative_root_record_is_not_read_against_the_working_directory(tmp_path, home):
    proj, _ = _project(tmp_path)
    cli("fetch", "m", cwd=proj, home=home)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pylmserv.lock").write_text("this is no lock [\n")
    (home / "gcroots" / "locks" / ("1" * 32)).write_text("pylmserv.lock")
    proc = cli("gc", "--dry-run", cwd=tmp_path / "elsewhere", home=home)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("state", ["verified.json"])
@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_doctor_and_verify_answer_with_a_planted_verify_record(state, kind, tmp_path, home):
    proj, _ = _project(tmp_path)
    cli("fetch", "m", cwd=proj, home=home)
    plant(home / state, kind)
    for args in (("doctor",), ("verify",)):
        proc = cli(*args, cwd=proj, home=home)
        assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_planted_manifest_does_not_hang_list_fetch_gc_verify(kind, tmp_path, home):
    proj, _ = _project(tmp_path)
    cli("fetch", "m", cwd=proj, home=home)
    plant(home / "models" / "m" / ".pylmserv.json", kind)
    for args in (("list",), ("fetch", "m"), ("gc", "--dry-run"), ("verify", "--no-repair")):
        proc = cli(*args, cwd=proj, home=home)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)


OUTSIDE_SIZE = 640  # the test model's size: a file outside with the same size


@pytest.mark.parametrize("manifest", [
    [],
    "x",
    {"files": "m.gguf"},
    {"files": {"m.gguf": "sha"}, "order": ["m.gguf"]},
    {"files": {"m.gguf": {"size": 640, "sha256": 5}}, "order": 7},
    {"files": {"m.gguf": {"size": 640, "sha256": "zz"}}},
    {"files": {"m.gguf": {"size": 640, "sha256": ["a"]}}},
    {"files": {"m.gguf": None, "": {}}},
    "OUTSIDE_ABS",
    "OUTSIDE_REL",
])
def test_an_edited_manifest_never_names_a_file_outside_the_entry(manifest, tmp_path, home):
    proj, hexdigest = _project(tmp_path)
    assert cli("fetch", "m", cwd=proj, home=home).returncode == 0
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"o" * (home / "models" / "m" / "m.gguf").stat().st_size)
    entry = home / "models" / "m"
    if manifest == "OUTSIDE_ABS":
        manifest = {"files": {str(outside): {"size": outside.stat().st_size, "sha256": hexdigest}}, "order": [str(outside)]}
    elif manifest == "OUTSIDE_REL":
        rel = os.path.relpath(outside, entry)
        manifest = {"files": {rel: {"size": outside.stat().st_size, "sha256": hexdigest}}, "order": [rel]}
    os.chmod(entry, 0o755)
    (entry / ".pylmserv.json").write_text(json.dumps(manifest))
    for args in (("list",), ("fetch", "m", "--offline"), ("gc", "--dry-run"), ("verify", "--no-repair"), ("fetch", "m")):
        proc = cli(*args, cwd=proj, home=home)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        assert str(outside) not in proc.stdout, (args, proc.stdout)
    from pylmserv.store.blobs import lookup

    found = lookup("m", home)
    assert found is None or all(home in Path(f.path).parents for f in found.files)


# -- installed binaries ------------------------------------------------------------------------

def test_install_replaces_a_link_planted_at_an_installed_binary(tmp_path):
    """A link at bin/<engine>-<backend>/<key>/<binary> to a file outside of the same size and
    mtime was taken as the installed copy: `current` then ran the file outside."""
    from pylmserv.store.installs import install_files

    build = tmp_path / "build" / "bin"
    build.mkdir(parents=True)
    src = build / "llama-server"
    src.write_bytes(b"real binary\n")
    outside = tmp_path / "outside"
    outside.write_bytes(b"evil binary\n")
    st = src.stat()
    os.utime(outside, ns=(st.st_atime_ns, st.st_mtime_ns))
    bindir = tmp_path / "bin" / "llama.cpp-cpu" / "key"
    bindir.mkdir(parents=True)
    os.symlink(outside, bindir / "llama-server")
    os.symlink(outside, bindir / f".llama-server.{os.getpid()}.tmp")  # the temp name, predicted
    out = install_files({"llama-server": src}, bindir)
    assert not os.path.islink(out["llama-server"]) and out["llama-server"].read_bytes() == b"real binary\n"
    assert outside.read_bytes() == b"evil binary\n"


# -- the project's own files ----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["pylmserv.toml", "pylmserv.lock"])
@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_fifo_or_device_as_config_or_lock_is_one_line(which, kind, tmp_path, home):
    from tests.test_clean_errors import one_clean_line

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text('[models.m]\nurl = "http://127.0.0.1/m.gguf"\n')
    plant(proj / which, kind)
    for args in (("list",), ("fetch", "m"), ("prefetch", "--via", "python")):
        msg = one_clean_line(cli(*args, cwd=proj, home=home), 2)
        assert "not a regular file" in msg


# -- builds ---------------------------------------------------------------------------------------

def test_a_link_planted_at_a_build_directory_is_never_built_into(tmp_path, home):
    """builds/<engine>-<backend>-<key> as a link to a directory outside: the build wrote its
    tree (and the llamafile copy deleted its src/) there, and a stamp planted there made
    `build` answer "up to date" with binaries from outside. The link is removed as a link."""
    import shutil

    from tests.test_build_skeleton import ToyBuild

    first = ToyBuild()
    first.run()
    outside = tmp_path / "outside"
    shutil.copytree(first.build_dir, outside)  # a stamp that says "done", outputs and all
    (outside / "toy-bin").write_text("evil\n")
    (outside / "keep").write_text("mine\n")
    shutil.rmtree(first.build_dir)
    os.symlink(outside, first.build_dir)
    again = ToyBuild()
    result = again.run()
    assert not result.cache_hit and again.calls["compile"] == 1
    assert not os.path.islink(again.build_dir) and (again.build_dir / "toy-bin").read_text() == "built\n"
    assert (outside / "keep").read_text() == "mine\n" and (outside / "toy-bin").read_text() == "evil\n"
    assert result.binaries["toy-bin"].read_text() == "built\n"


def test_a_link_planted_at_the_build_log_is_never_appended_to(tmp_path):
    from pylmserv.builders.llama_cpp import run_logged

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    log = tmp_path / "pylmserv-build.log"
    os.symlink(victim, log)
    run_logged([sys.executable, "-c", "print('hello')"], log, dict(os.environ), 60, "step")
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(log) and "hello" in log.read_text()
