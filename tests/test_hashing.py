"""Hash: every encoding of every algorithm, checked against `nix hash to-*` (real Nix)."""
from __future__ import annotations

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
