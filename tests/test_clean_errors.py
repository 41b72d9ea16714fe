"""Hostile or unlucky environments give one line and a hint (exit 2), never a traceback:
very deep trees (hashed like Nix), flat hashes of directories, read-only stores (which
still serve reads), a PYLMSERV_HOME that is a file, over-long names, deep config values."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pylmserv.core.hashing import Hash
from pylmserv.core.nar import nar_hash
from tests.conftest import run_cli
from tests.support.faultserver import fault_server
from tests.test_gguf import write_gguf


def one_clean_line(proc, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), proc.stderr
    return lines[-2]


def deep_tree(root: Path, levels: int) -> Path:
    """root/d/d/.../d/f, `levels` directories deep (made with relative paths: the whole
    path is longer than some tools accept in one piece)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(wfd, b"bottom\n")
        os.close(wfd)
        os.symlink("../..", "up", dir_fd=fd)
    finally:
        os.close(fd)
    return root


@pytest.mark.nix
def test_thousand_levels_deep_tree_hashes_like_nix(tmp_path, nix):
    tree = deep_tree(tmp_path / "deep", 1000)
    try:
        out = subprocess.run(["nix", "hash", "path", str(tree)], capture_output=True, text=True, timeout=300,
                             check=True)
        expected = Hash.parse(out.stdout.strip())
        assert nar_hash(tree) == expected
        proc = run_cli("hash", tree)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == expected.sri
    finally:
        # pytest's own cleanup recurses and cannot remove 1,000 levels; GNU rm can.
        subprocess.run(["rm", "-rf", str(tree)], timeout=120)


def test_flat_hash_of_a_directory_is_one_line(tmp_path):
    (tmp_path / "dir").mkdir()
    line = one_clean_line(run_cli("hash", "--mode", "flat", tmp_path / "dir"))
    assert "is a directory" in line


def test_home_that_is_a_file(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a directory")
    for args in (["fetch", "file:///etc/hostname", "--sha256", "0" * 64], ["verify"]):
        line = one_clean_line(run_cli(*args, env={"PYLMSERV_HOME": str(home)}))
        assert "is not a directory" in line
    assert home.read_text() == "not a directory"
    below = one_clean_line(run_cli("verify", env={"PYLMSERV_HOME": str(home / "sub")}))
    assert "not a directory" in below


def test_a_home_made_by_another_thread_between_the_look_and_the_mkdir_is_fine(tmp_path, monkeypatch):
    """The race four threads of ensure_source hit at once: one sees no home, another makes
    it, the first must use it (it raised "is not a directory" before)."""
    from pylmserv.store import layout

    root = tmp_path / "home"
    root.mkdir()
    real_isdir, looks = os.path.isdir, []

    def first_look_misses(p):
        if str(p) == str(root) and not looks:
            looks.append(p)
            return False  # the home appears right after this look
        return real_isdir(p)

    monkeypatch.setattr(layout.os.path, "isdir", first_look_misses)
    assert layout.ensure_home(root) == root and looks


def test_deeply_nested_config_value(tmp_path):
    config = tmp_path / "pylmserv.toml"
    for depth in (40, 5000):  # one the parser reads, one that exhausts its recursion
        config.write_text('[models.x]\nurl = "http://127.0.0.1:9/x.gguf"\nextra = ' + "[" * depth + "]" * depth + "\n")
        line = one_clean_line(run_cli("--config", config, "list"))
        assert "nested more than" in line


def test_absurdly_long_file_name(home, tmp_path):
    data = write_gguf(tmp_path / "m.gguf", pad=4096).read_bytes()
    with fault_server() as server:
        url = server.add("m" * 300 + ".gguf", data)
        line = one_clean_line(run_cli("fetch", url, "--sha256", Hash.of_bytes(data).hex, "--no-progress",
                                      env={"PYLMSERV_HOME": str(home)}))
    assert "File name too long" in line


@pytest.fixture
def read_only_home(tmp_path):
    """A populated store, then the same directory bind-mounted read-only (needs mount
    privileges; skipped where there are none)."""
    writable = tmp_path / "home"
    model = write_gguf(tmp_path / "tiny.gguf", pad=64 << 10)
    h = Hash.of_bytes(model.read_bytes())
    proc = run_cli("fetch", f"file://{model}", "--sha256", h.hex, "--no-progress",
                   env={"PYLMSERV_HOME": str(writable)})
    assert proc.returncode == 0, proc.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(writable), str(ro)], capture_output=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True, timeout=30)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.decode().strip()}")
        yield ro, model, h
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True, timeout=30)


def snapshot(root: Path) -> list:
    return sorted((str(p.relative_to(root)), p.lstat().st_mtime_ns, p.lstat().st_size) for p in root.rglob("*"))


def test_read_only_store_serves_reads_and_refuses_writes_in_one_line(read_only_home, tmp_path):
    ro, model, h = read_only_home
    env = {"PYLMSERV_HOME": str(ro)}
    before = snapshot(ro)
    proc = run_cli("fetch", "--offline", f"file://{model}", "--sha256", h.hex, "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "already in the store" in proc.stderr
    proc = run_cli("fetch", "--offline", f"file://{model}", "--sha256", h.hex, "--json", env=env)
    assert proc.returncode == 0 and '"bytes_downloaded": 0' in proc.stdout
    proc = run_cli("list", env=env)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(ro) == before
    other = tmp_path / "other.bin"
    other.write_bytes(b"new bytes")
    line = one_clean_line(run_cli("fetch", f"file://{other}", "--sha256", Hash.of_bytes(b"new bytes").hex,
                                  "--no-progress", env=env))
    assert "Read-only file system" in line
