"""NAR serialisation vs real Nix: hypothesis-generated trees hashed by `nix hash path`,
`nix-store --dump` byte-for-byte, flat files vs `nix hash file`."""
from __future__ import annotations

import io
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pylmserv.core.hashing import Hash
from pylmserv.core.nar import dump, hash_path, nar_hash

pytestmark = pytest.mark.nix

# Names that stress padding (7/8/9/16 bytes), sorting by raw bytes, and non-UTF-8.
FIXED_NAMES = [b"a" * 7, b"b" * 8, b"c" * 9, b"d" * 16, b"\xff\xfe-latin1", b"caf\xc3\xa9", b"\x80", b"Z", b"a.b",
               b"-dash", b"A" * 15, b"e" * 17]
name_st = st.one_of(st.sampled_from(FIXED_NAMES),
                    st.binary(min_size=1, max_size=20).filter(lambda b: b"/" not in b and b"\0" not in b
                                                              and b not in (b".", b"..")))
MODES = [0o644, 0o755, 0o654, 0o610, 0o700, 0o444, 0o555, 0o604]  # incl. group-only and other-only exec
file_st = st.tuples(st.just("file"), st.binary(max_size=300) | st.sampled_from([b"", b"x" * 8, b"y" * 4097]),
                    st.sampled_from(MODES))
link_st = st.tuples(st.just("link"), st.sampled_from([b"target", b"/abs/olute", b"../up", b"dangling/x",
                                                      b"a" * 7, b"\xff\xfe-latin1", b"."]))
tree_st = st.recursive(
    file_st | link_st | st.just(("dir", {})),
    lambda children: st.tuples(st.just("dir"), st.dictionaries(name_st, children, max_size=5)),
    max_leaves=25)
root_st = st.one_of(tree_st, file_st, link_st)


def build(path: bytes, node) -> None:
    kind = node[0]
    if kind == "file":
        with open(path, "wb") as f:
            f.write(node[1])
        os.chmod(path, node[2])
    elif kind == "link":
        os.symlink(node[1], path)
    else:
        os.mkdir(path)
        for name, child in node[1].items():
            build(path + b"/" + name, child)


def nix_hash_path(path) -> Hash:
    out = subprocess.run([b"nix", b"hash", b"path", os.fsencode(path)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return Hash.parse(out.stdout.decode().strip())


def nix_dump(path) -> bytes:
    out = subprocess.run([b"nix-store", b"--dump", os.fsencode(path)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout


def our_dump(path) -> bytes:
    buf = io.BytesIO()
    dump(path, buf.write)
    return buf.getvalue()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(root=root_st)
def test_random_trees_match_nix_hash_path(nix, tmp_path_factory, root):
    base = tmp_path_factory.mktemp("tree")
    target = os.fsencode(base) + b"/root"
    build(target, root)
    assert nar_hash(target) == nix_hash_path(target)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(root=tree_st)
def test_random_trees_nar_bytes_equal_nix_store_dump(nix, tmp_path_factory, root):
    base = tmp_path_factory.mktemp("dump")
    target = os.fsencode(base) + b"/root"
    build(target, root)
    assert our_dump(target) == nix_dump(target)


def test_deep_nesting_and_wide_dirs(nix, tmp_path):
    deep = tmp_path / "deep"
    p = deep
    for i in range(80):
        p = p / f"level{i % 10}"
    p.mkdir(parents=True)
    (p / "leaf").write_bytes(b"bottom")
    wide = deep / "wide"
    wide.mkdir()
    for i in range(500):
        (wide / f"f{i:04d}").write_bytes(os.urandom(i % 37))
    assert nar_hash(deep) == nix_hash_path(deep)


def test_root_symlinks_are_not_followed(nix, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    os.symlink("real", tmp_path / "dirlink")
    os.symlink("/nonexistent/target", tmp_path / "dangling")
    for name in ("dirlink", "dangling"):
        assert nar_hash(tmp_path / name) == nix_hash_path(tmp_path / name)
    assert nar_hash(tmp_path / "dirlink") != nar_hash(tmp_path / "real")


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 1 << 20, (1 << 20) + 3, 5 * (1 << 20) + 1])
def test_flat_files_match_nix_hash_file(nix, tmp_path, size):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(size))
    out = subprocess.run(["nix", "hash", "file", str(f)], capture_output=True, text=True, timeout=60, check=True)
    assert hash_path(f) == Hash.parse(out.stdout.strip())
    assert hash_path(f, "nar") == nix_hash_path(f)  # a file in NAR mode, as `nix hash path` does


def test_sha512_and_sha1_nar_match_nix(nix, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_bytes(b"abc")
    for algo in ("sha512", "sha1"):
        out = subprocess.run(["nix", "hash", "path", "--type", algo, str(tmp_path / "t")], capture_output=True,
                             text=True, timeout=60, check=True)
        assert nar_hash(tmp_path / "t", algo) == Hash.parse(out.stdout.strip())


def test_stream_buffers_boundaries_and_reuse_match_nix_store_dump(nix, tmp_path):
    """Files that end exactly at, just before and just after a stream buffer's end, and one
    larger than all buffers together (they are reused while it is read): byte-for-byte
    what `nix-store --dump` writes."""
    from pylmserv.core import nar

    root = tmp_path / "t"
    root.mkdir()
    seg = nar.SEGMENT
    for i, size in enumerate([seg - 120, seg, seg + 1, 3, seg * nar.SEGMENTS + 12345, 0, 2 * seg - 7]):
        (root / f"f{i}").write_bytes(os.urandom(size))
    os.symlink("x" * 4000, root / "long-link")
    assert our_dump(root) == nix_dump(root)
    assert nar_hash(root) == nix_hash_path(root)

