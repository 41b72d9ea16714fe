"""`fetch --dest DIR`: nothing outside the model folder is ever followed or copied, and
nothing already in DIR is written through (real loopback server, real archives)."""
from __future__ import annotations

import os

import pytest

from pylmserv.app.fetch_models import fetch
from pylmserv.core.errors import VerificationError
from pylmserv.core.hashing import Hash
from tests.conftest import run_cli
from tests.test_fetch import tar_gz
from tests.test_gguf import write_gguf


@pytest.fixture
def model(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf", pad=64 << 10).read_bytes()


def test_symlink_to_an_ancestor_is_copied_as_a_link_not_followed(home, server, model, tmp_path):
    """`pack/loop -> .` stays inside the archive (the data policy accepts it), but a copy
    that follows it recurses until the path is too long: --dest recreates the link."""
    blob = tar_gz({"pack/tiny.gguf": model}, {"pack/loop": ".", "pack/up": "../pack"})
    url = server.add("pack.tar.gz", blob)
    dest = tmp_path / "d"
    proc = run_cli("fetch", url, "--sha256", Hash.of_bytes(blob).hex, "--dest", dest, "--no-progress",
                   env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    out = dest / "pack" / "pack"
    assert (out / "tiny.gguf").read_bytes() == model and not (out / "tiny.gguf").is_symlink()
    assert os.readlink(out / "loop") == "." and os.readlink(out / "up") == "../pack"
    assert sorted(p.name for p in out.iterdir()) == ["loop", "tiny.gguf", "up"]


def test_dest_entry_that_is_a_symlink_elsewhere_is_replaced_not_followed(home, server, model, tmp_path):
    """DIR/<name> planted as a symlink to a directory the user cares about: the fetch
    replaces the link; the directory it pointed at is neither emptied nor written."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    dest = tmp_path / "d"
    dest.mkdir()
    os.symlink(victim, dest / "pack")
    blob = tar_gz({"pack/tiny.gguf": model})
    url = server.add("pack.tar.gz", blob)
    fetch([url], sha256=Hash.of_bytes(blob), dest=dest, progress=False)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert (victim / "keep.txt").read_text() == "precious"
    assert not (dest / "pack").is_symlink() and (dest / "pack" / "pack" / "tiny.gguf").read_bytes() == model


def test_tampered_store_entry_with_an_escaping_symlink_is_never_copied(home, server, model, tmp_path):
    """A link to a host file slipped into the unpacked entry after its verification:
    --dest refuses, copies nothing, and names `verify`."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    blob = tar_gz({"pack/tiny.gguf": model})
    url = server.add("pack.tar.gz", blob)
    [r] = fetch([url], sha256=Hash.of_bytes(blob), progress=False)
    entry = home / "models" / "pack"
    os.symlink(secret, entry / "pack" / "leak.txt")
    os.symlink("../../../..", entry / "pack" / "up")
    dest = tmp_path / "d"
    with pytest.raises(VerificationError, match="leaves the model folder") as exc:
        fetch([url], sha256=Hash.of_bytes(blob), dest=dest, progress=False)
    assert "pylmserv verify pack" in exc.value.hint
    assert not (dest / "pack").exists()
    assert [p.name for p in dest.iterdir()] == []  # no temp copy left behind either


def test_dest_file_that_is_a_symlink_is_replaced_not_written_through(home, server, model, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    dest = tmp_path / "d"
    dest.mkdir()
    os.symlink(victim, dest / "tiny.gguf")
    url = server.add("tiny.gguf", model)
    fetch([url], sha256=Hash.of_bytes(model), dest=dest, progress=False)
    assert victim.read_text() == "precious"
    assert not (dest / "tiny.gguf").is_symlink() and (dest / "tiny.gguf").read_bytes() == model


def test_archive_with_a_symlink_loop_and_dest_is_one_clean_line(home, server, model, tmp_path):
    blob = tar_gz({"pack/tiny.gguf": model}, {"pack/a": "b", "pack/b": "a"})
    url = server.add("loop.tar.gz", blob)
    dest = tmp_path / "d"
    proc = run_cli("fetch", url, "--sha256", Hash.of_bytes(blob).hex, "--dest", dest, "--no-progress",
                   env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "symlink loop" in ln]
    assert len(errors) == 1 and errors[0].startswith("error")
    assert not (dest / "loop").exists() and not (home / "models" / "loop").exists()
