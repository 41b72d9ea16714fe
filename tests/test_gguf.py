"""GGUF header and split-set checks, on real files written with the `gguf` package."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pylmserv.core.errors import VerificationError
from pylmserv.core.gguf import check_split_set, read_header, split_info, split_names


def write_gguf(path: Path, *, tensors: int = 2, split: tuple = None, arch: str = "llama", pad: int = 0) -> Path:
    """A tiny real GGUF (v3) file: metadata incl. a string array, `tensors` small tensors.

    split=(no, count) adds llama.cpp's split.no / split.count / split.tensors.count keys.
    pad adds a tensor of `pad` float32 zeros (to make multi-MB test downloads)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "world"])
    w.add_array("tokenizer.ggml.scores", [0.0, 0.0, -1.0, -2.0])
    if split is not None:
        w.add_uint16("split.no", split[0])
        w.add_uint16("split.count", split[1])
        w.add_int32("split.tensors.count", tensors * split[1])
    for i in range(tensors):
        w.add_tensor(f"t{i}", np.full((4, 8), i, dtype=np.float32))
    if pad:
        rng = np.random.default_rng(len(str(path)) + pad)
        w.add_tensor("pad", rng.standard_normal(pad // 4).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_bytes(tmp_path: Path, name: str = "m.gguf", **kw) -> bytes:
    return write_gguf(tmp_path / name, **kw).read_bytes()


def test_read_header_of_real_file_matches_gguf_reader(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "m.gguf", tensors=3)
    h = read_header(path)
    r = gguf.GGUFReader(str(path))
    assert h.version == 3
    assert h.tensor_count == len(r.tensors) == 3
    # GGUFReader also lists 3 pseudo-fields (version, tensor count, kv count).
    assert h.kv_count == len(r.fields) - 3
    assert h.architecture == "llama"
    assert h.metadata["llama.context_length"] == 64
    assert h.metadata["tokenizer.ggml.tokens"] is None  # arrays are skipped, not loaded


def test_html_page_is_rejected_with_a_clear_reason(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    with pytest.raises(VerificationError, match="HTML") as exc:
        read_header(path)
    assert "not a valid GGUF" in exc.value.message


@pytest.mark.parametrize("mutate, why", [
    (lambda b: b[:4] + struct.pack("<I", 99) + b[8:], "unsupported GGUF version 99"),
    (lambda b: b[:8] + struct.pack("<Q", 1 << 40) + b[16:], "implausible tensor count"),
    (lambda b: b[:16] + struct.pack("<Q", 1 << 40) + b[24:], "implausible metadata count"),
    (lambda b: b[:40], "truncated|implausible string length|past the end"),
    (lambda b: b[:3], "only 3 bytes"),
])
def test_corrupt_headers_are_rejected(tmp_path, mutate, why):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(good))
    with pytest.raises(VerificationError, match=why):
        read_header(bad)


def test_header_claiming_more_tensors_than_fit_is_rejected(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", tensors=1).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[:8] + struct.pack("<Q", 100000) + good[16:])
    with pytest.raises(VerificationError, match="cannot fit"):
        read_header(bad)


def test_split_names():
    assert split_info("Big-Model-Q4-00002-of-00003.gguf") == ("Big-Model-Q4", 2, 3)
    assert split_info("model.gguf") is None
    assert split_names("a/x-00002-of-00003.gguf") == ["x-00001-of-00003.gguf", "x-00002-of-00003.gguf",
                                                       "x-00003-of-00003.gguf"]


def test_complete_split_set_passes(tmp_path):
    paths = [write_gguf(tmp_path / f"big-{i:05d}-of-00003.gguf", split=(i - 1, 3)) for i in (1, 2, 3)]
    headers = check_split_set(list(reversed(paths)))
    assert [h.split_no for h in headers] == [0, 1, 2]


def test_incomplete_split_set_names_the_missing_shard(tmp_path):
    paths = [write_gguf(tmp_path / f"big-{i:05d}-of-00003.gguf", split=(i - 1, 3)) for i in (1, 3)]
    with pytest.raises(VerificationError, match="missing big-00002-of-00003.gguf"):
        check_split_set(paths)


def test_shards_from_different_sets_are_rejected(tmp_path):
    a = write_gguf(tmp_path / "big-00001-of-00002.gguf", split=(0, 2))
    b = write_gguf(tmp_path / "big-00002-of-00002.gguf", split=(1, 4))
    with pytest.raises(VerificationError, match="split.count=4"):
        check_split_set([a, b])
