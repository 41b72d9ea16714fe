"""Names pylmserv writes in tmp/ are predictable (dl-<key>.part, its state and lock, the
state's temp name): a symlink or a hard link planted there must never make a download write
into a file outside the home (issue 18). Each is dropped as a name; the download works."""
from __future__ import annotations

import hashlib
import os
import threading

import pytest

from pylmserv.core.hashing import Hash
from pylmserv.transfer.download import download
from tests.support.httpserver import serve_directory

PRECIOUS = b"precious, outside the home\n"
DATA = os.urandom(3 << 20)


def _key(h: Hash) -> str:
    return hashlib.sha256(h.hex.encode()).hexdigest()[:32]


@pytest.mark.parametrize("connections", [1, 4])
@pytest.mark.parametrize("how", ["symlink", "hardlink"])
@pytest.mark.parametrize("suffix", [".part", ".lock", ".state.json", ".state.json.PID.tmp"])
def test_a_link_planted_at_a_download_name_is_never_written_through(connections, how, suffix, tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "m.bin").write_bytes(DATA)
    victim = tmp_path / "victim"
    victim.write_bytes(PRECIOUS)
    tmp = tmp_path / "home" / "tmp"
    tmp.mkdir(parents=True)
    h = Hash.of_bytes(DATA)
    name = tmp / ("dl-" + _key(h) + suffix.replace("PID", str(os.getpid())))
    (os.symlink if how == "symlink" else os.link)(victim, name)
    with serve_directory(tmp_path / "www") as url:
        download(f"{url}/m.bin", tmp_path / "out", expected=h, size=len(DATA), connections=connections,
                 tmp_dir=tmp, progress=False, min_part_size=256 << 10)
    assert (tmp_path / "out").read_bytes() == DATA
    assert victim.read_bytes() == PRECIOUS


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_a_link_planted_at_the_file_url_copy_name_is_never_written_through(how, tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(DATA[:1000])
    victim = tmp_path / "victim"
    victim.write_bytes(PRECIOUS)
    dest = tmp_path / "dest" / "m"
    dest.parent.mkdir()
    planted = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
    (os.symlink if how == "symlink" else os.link)(victim, planted)
    download(f"file://{src}", dest, expected=Hash.of_bytes(DATA[:1000]), progress=False)
    assert dest.read_bytes() == DATA[:1000]
    assert victim.read_bytes() == PRECIOUS
