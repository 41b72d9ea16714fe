"""Tried as an attacker (issue 18): every builder path that walks or copies a tree survives a
tree 1,000 directories deep (Python 3.11's os.walk and shutil.copytree recurse once per
level: RecursionError), never follows a link planted in it, and never blocks on a FIFO."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from pylmserv.core.errors import PylmservError

DEPTH = 1000


def deep_tree(top: Path, levels: int = DEPTH, leaf: str = "f", data: bytes = b"deep\n") -> Path:
    """top/d/d/.../d/<leaf>, made with relative mkdirs (a path 2,000 characters long is fine,
    one made by a single mkdir call of 1,000 levels is not on every filesystem)."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(wfd, data)
        os.close(wfd)
    finally:
        os.close(fd)
    return top


def deep_leaf(top: Path, levels: int = DEPTH, leaf: str = "f") -> str:
    return os.path.join(str(top), *(["d"] * levels), leaf)


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path):
    """pytest's own cleanup recurses: remove what a test made iteratively."""
    yield
    from pylmserv.core.fsutil import remove_no_follow

    for child in list(tmp_path.iterdir()):
        remove_no_follow(child)


@pytest.fixture
def low_recursion():
    """The recursion limit Python starts with (pytest may raise it)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def llamafile_build(build_dir: Path, source_dir=None):
    from pylmserv.builders.llamafile import LlamafileBuild

    b = LlamafileBuild.__new__(LlamafileBuild)
    b.build_dir = build_dir
    b.src = build_dir / "src"
    b.source_dir = source_dir
    return b


def test_llamafile_copies_a_source_1000_deep(tmp_path, low_recursion):
    src = deep_tree(tmp_path / "source")
    (src / "Makefile").write_text("all:\n")
    (src / ".cosmocc").mkdir()
    (src / ".cosmocc" / "junk").write_text("x")
    os.chmod(src / "Makefile", 0o444)
    (tmp_path / "build").mkdir()
    b = llamafile_build(tmp_path / "build")
    b._copy_source(src)
    assert Path(deep_leaf(b.src)).read_bytes() == b"deep\n"
    assert not (b.src / ".cosmocc").exists()
    assert os.stat(b.src / "Makefile").st_mode & 0o200  # writable copy


def test_llamafile_copy_keeps_links_as_links_and_refuses_a_fifo(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    src = tmp_path / "source"
    src.mkdir()
    (src / "Makefile").write_text("all:\n")
    os.symlink(outside, src / "link")
    os.chmod(outside / "secret", 0o400)
    (tmp_path / "build").mkdir()
    b = llamafile_build(tmp_path / "build")
    b._copy_source(src)
    assert os.readlink(b.src / "link") == str(outside)
    assert stat.S_IMODE(os.stat(outside / "secret").st_mode) == 0o400  # never chmod'ed through the link
    os.mkfifo(src / "pipe")
    b2 = llamafile_build(tmp_path / "build", source_dir=src)
    with pytest.raises(PylmservError) as exc:
        b2._copy_source(src)  # would block forever opening the FIFO
    assert "pipe" in exc.value.message


def test_cosmocc_fix_exec_bits_1000_deep(tmp_path, low_recursion):
    from pylmserv.builders.cosmocc import fix_exec_bits

    deep_tree(tmp_path / "t", data=b"\x7fELF....")
    os.mkfifo(tmp_path / "t" / "pipe", 0o644)  # not opened (it would block)
    assert fix_exec_bits(tmp_path / "t") == ["/".join(["d"] * DEPTH + ["f"])]
    assert os.stat(deep_leaf(tmp_path / "t")).st_mode & 0o111


def test_cosmocc_shim_tree_1000_deep(tmp_path, low_recursion):
    from pylmserv.builders.llamafile import _shim_tree

    store = deep_tree(tmp_path / "store", data=b"MZqFpD='\n")
    os.chmod(deep_leaf(store), 0o755)
    (store / "plain").write_text("p")
    os.mkfifo(store / "pipe")
    n = _shim_tree(store, tmp_path / "out", "/loader", lambda p: Path(p).read_bytes().startswith(b"MZqFpD"))
    shim = Path(deep_leaf(tmp_path / "out"))
    assert shim.read_text().startswith("#!/bin/sh") and "/loader" in shim.read_text()
    assert os.readlink(tmp_path / "out" / "plain") == str(store / "plain")
    assert os.path.islink(tmp_path / "out" / "pipe")
    assert n == 1


def test_store_size_1000_deep(tmp_path, low_recursion):
    from pylmserv.core.fsutil import tree_size

    deep_tree(tmp_path / "t", data=b"12345")
    assert tree_size(tmp_path / "t") == 5
