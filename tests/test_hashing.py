"""Hash: every encoding of every algorithm, checked against `nix hash to-*` (real Nix); the NAR
walk without recursion, a failing consumer of its stream, a file that grows while hashed."""
from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pylmserv.core.errors import HashError
from pylmserv.core.hashing import EMPTY_SHA256, SIZES, Hash, nix32_decode, nix32_encode

ALGOS = sorted(SIZES)


def nix_convert(to: str, value: str, algo: str) -> str:
    out = subprocess.run(["nix", "hash", f"to-{to}", "--type", algo, value], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.nix
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(algo=st.sampled_from(ALGOS), data=st.data())
def test_all_encodings_agree_with_nix(nix, algo, data):
    digest = data.draw(st.binary(min_size=SIZES[algo], max_size=SIZES[algo]))
    h = Hash(algo, digest)
    assert h.nix32 == nix_convert("base32", h.hex, algo)
    assert h.sri == nix_convert("sri", h.nix32, algo)
    assert h.base64 == nix_convert("base64", h.sri, algo)
    assert h.hex == nix_convert("base16", h.base64, algo)


@given(algo=st.sampled_from(ALGOS), data=st.data())
def test_round_trip_every_encoding(algo, data):
    h = Hash(algo, data.draw(st.binary(min_size=SIZES[algo], max_size=SIZES[algo])))
    assert nix32_decode(nix32_encode(h.digest), len(h.digest)) == h.digest
    for text in (h.sri, f"{algo}:{h.nix32}", f"{algo}:{h.hex}", f"{algo}:{h.base64}"):
        assert Hash.parse(text) == h
    for fmt in ("hex", "nix32", "base64"):
        assert Hash.parse(h.format(fmt), algo=algo) == h
    if algo == "sha256":
        assert Hash.parse(h.hex) == h and Hash.parse(h.nix32) == h  # lengths are unambiguous


def test_known_values():
    assert EMPTY_SHA256.hex == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert EMPTY_SHA256.nix32 == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    assert EMPTY_SHA256.sri == "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    abc = Hash.of_bytes(b"abc")
    assert abc.nix32 == "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"  # from `nix hash to-base32`


@pytest.mark.parametrize("bad", ["", "sha256-", "sha256-!!!!", "sha256:xyz", "zz" * 32, "sha999-AAAA",
                                 "sha256:" + "e" * 52, "sha256:" + "0" * 63, "md5-" + "A" * 44])
def test_bad_hashes_raise_hash_error_with_hint(bad):
    with pytest.raises(HashError) as exc:
        Hash.parse(bad)
    assert exc.value.exit_code == 2 and "\n" not in exc.value.message


def test_nix32_rejects_overflow():
    # 52 nix32 chars carry 260 bits; the top 4 must be zero for a 256-bit digest.
    with pytest.raises(HashError):
        Hash.parse("sha256:" + "z" * 52)


def test_special_files_are_refused_by_nar(tmp_path):
    """A fifo has no NAR form (no Nix needed to know: NAR has no node type for it)."""
    import os

    from pylmserv.core.nar import nar_hash

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="not a file, directory or symlink"):
        nar_hash(tmp_path)


def test_thousand_levels_deep_without_recursion(deep_tmp_path):
    """The walk keeps its own stack: 1,000 levels hash under a recursion limit of 200
    (the CLI and Nix oracle check of the same depth is in test_clean_errors)."""
    import sys

    from tests.test_clean_errors import deep_tree

    tree = deep_tree(deep_tmp_path / "deep", 1000)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)
    try:
        got = _dump(tree)
    finally:
        sys.setrecursionlimit(limit)
        subprocess.run(["rm", "-rf", str(tree)], timeout=120)
    assert got.count(b"directory") == 1001 and b"bottom\n" in got
    assert got.endswith(_close_all(1001))  # every directory closed, root included


def _close_all(levels: int) -> bytes:
    close = (1).to_bytes(8, "little") + b")" + bytes(7)  # the NAR string ")"
    return close * (2 * levels - 1)  # each directory node, and each entry but the root's


def test_a_failing_writer_stops_the_walk(tmp_path):
    """An error in the consumer of the stream surfaces in the caller; nothing hangs."""
    from pylmserv.core import nar

    root = tmp_path / "t"
    root.mkdir()
    for i in range(40):
        (root / f"f{i}").write_bytes(os.urandom(300_000))
    calls = []

    def write(chunk):
        calls.append(len(chunk))
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        nar.dump(root, write)
    assert len(calls) == 1


def test_a_file_that_grows_while_hashed_is_refused(tmp_path, monkeypatch):
    from pylmserv.core import nar
    from pylmserv.core.errors import NarError

    f = tmp_path / "f"
    f.write_bytes(b"a" * 100)
    real_lstat = os.lstat

    def lstat_then_grow(path, *a, **kw):
        st = real_lstat(path, *a, **kw)
        if os.fsencode(path) == os.fsencode(f):
            with open(f, "ab") as out:
                out.write(b"more")
        return st

    monkeypatch.setattr(nar.os, "lstat", lstat_then_grow)
    with pytest.raises(NarError, match="changed size"):
        nar.nar_hash(f)


def _dump(path) -> bytes:
    import io

    from pylmserv.core.nar import dump

    buf = io.BytesIO()
    dump(path, buf.write)
    return buf.getvalue()
