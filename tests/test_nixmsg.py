"""nixmsg: every known Nix / Lix hash-mismatch format, from a corpus of real outputs."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pylmserv.core.errors import HashError
from pylmserv.core.hashing import Hash
from pylmserv.pins.nixmsg import got_hash, parse, strip_ansi

CORPUS = Path(__file__).parent / "data" / "nixmsg"
EXPECTED = {k: v for k, v in json.loads((CORPUS / "expected.json").read_text()).items() if not k.startswith("_")}


def test_every_corpus_file_has_an_expectation():
    files = sorted(p.name for p in CORPUS.glob("*.txt"))
    assert files == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus(name):
    found = parse((CORPUS / name).read_text(encoding="utf-8"))
    want = EXPECTED[name]
    assert [m.got for m in found] == [Hash.parse(w["got"]) for w in want]
    assert [m.wanted for m in found] == [Hash.parse(w["wanted"]) if w["wanted"] else None for w in want]
    for m, w in zip(found, want):
        assert m.url == w.get("url")
        assert m.got_path == w.get("got_path")


def test_all_formats_concatenated_in_order():
    names = sorted(EXPECTED)
    text = "\n".join((CORPUS / n).read_text(encoding="utf-8") for n in names)
    got = [m.got for m in parse(text)]
    assert got == [Hash.parse(w["got"]) for n in names for w in EXPECTED[n]]


def test_ansi_is_ignored():
    raw = (CORPUS / "nix-2.8-fod-ansi-tty.txt").read_text()
    assert "\x1b[" in raw and "\x1b[" not in strip_ansi(raw)


def test_got_hash_single_none_and_conflicting():
    assert got_hash((CORPUS / "nix-2.3-wanted-got.txt").read_text()).nix32 == "0y6sjbzg5qqqip9sc9ajyd5ra3n2wwvarj6nhpzjhh05kqz3qja4"
    with pytest.raises(HashError, match="no hash mismatch"):
        got_hash("error: builder for '/nix/store/x.drv' failed with exit code 1")
    with pytest.raises(HashError, match="2 different"):
        got_hash((CORPUS / "nix-2.8-two-fods-keep-going.txt").read_text())


def test_crlf_and_no_false_positive_on_got_path_only():
    text = (CORPUS / "lix-2.92-got-path.txt").read_text().replace("\n", "\r\n")
    assert len(parse(text)) == 1
    assert parse("     got path: /nix/store/abc\n expected path: /nix/store/def\n") == []


@pytest.mark.nix
def test_live_nix_fod_output_parses(nix, tmp_path):
    """Not only the recorded corpus: this Nix's live output right now."""
    f = tmp_path / "payload.bin"
    f.write_bytes(b"live\n")
    expr = f'import <nix/fetchurl.nix> {{ url = "{f.as_uri()}"; sha256 = ""; }}'
    proc = subprocess.run(["nix-build", "--no-out-link", "--expr", expr], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert got_hash(proc.stderr) == Hash.of_bytes(b"live\n")


def test_unparseable_specified_value_still_yields_got():
    # Seen when a FOD is written with a placeholder instead of a hash: the wanted side is
    # not a hash, but the got side must still be read (was an IndexError).
    text = (
        "error: hash mismatch in fixed-output derivation '/nix/store/abc-source.drv':\n"
        "         specified: (empty)\n"
        "            got:    sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
    )
    found = parse(text)
    assert len(found) == 1
    assert found[0].got == Hash.of_bytes(b"")
    assert found[0].wanted is None
