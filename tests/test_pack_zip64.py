"""pack with a model over 4 GiB: ZIP64 records, checked with zipfile and `unzip`.

The model is a sparse file (a GGUF header, a 4 GiB hole, a tail), so the test is fast and
the packed output stays sparse too: its disk usage is checked to stay small."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zipfile

from pylmserv.app.pack import U32, pack
from tests.test_pack import gguf_header, local_data_offset, make_llamafile


def test_pack_zip64_sparse_model_over_4gib(tmp_path):
    lf = tmp_path / "lf"
    make_llamafile(lf, 5001)
    model = tmp_path / "huge.gguf"
    size = (1 << 32) + 123_457
    tail = os.urandom(4096)
    with open(model, "wb") as f:
        header = gguf_header(1)
        f.write(gguf_header(size - len(header)))  # one I8 tensor filling the file: a loadable layout
        f.truncate(size)
        f.seek(size - len(tail))
        f.write(tail)
    out = tmp_path / "huge.llamafile"

    result = pack(model, lf, out, args=["-ngl", "999"])

    assert result.zip64
    assert any("Windows cannot run executables over 4 GiB" in w for w in result.warnings)
    st = os.stat(out)
    assert st.st_size > size
    assert st.st_blocks * 512 < 64 * 2**20, "the packed output should stay sparse"
    with zipfile.ZipFile(out) as z:
        info = z.getinfo("huge.gguf")
        assert info.file_size == size and info.compress_type == zipfile.ZIP_STORED
        args_info = z.getinfo(".args")
        assert args_info.header_offset > U32  # an offset past 4 GiB: ZIP64 extra in the central record
        assert z.read(".args") == b"-m\n/zip/huge.gguf\n-ngl\n999\n...\n"
        with z.open("huge.gguf") as member:
            assert member.read(8) == b"GGUF" + struct.pack("<I", 3)
    with open(out, "rb") as f:
        head = f.read(info.header_offset + 200)
        start = local_data_offset(head, info.header_offset)
        assert start % 65536 == 0
        f.seek(start + size - len(tail))
        assert f.read(len(tail)) == tail
        name_len, extra_len = struct.unpack_from("<HH", head, info.header_offset + 26)
        extra = head[info.header_offset + 30 + name_len:info.header_offset + 30 + name_len + extra_len]
        hid, hlen, usize, csize = struct.unpack_from("<HHQQ", extra, 0)
        assert (hid, hlen, usize, csize) == (1, 16, size, size)  # ZIP64 sizes in the local header too
    # unzip reads the ZIP64 end records and tests one entry (testing 4 GiB of zeros takes ~30 s)
    proc = subprocess.run([shutil.which("unzip"), "-t", str(out), ".args"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "No errors detected" in proc.stdout, proc.stdout + proc.stderr
    listing = subprocess.run([shutil.which("unzip"), "-l", str(out)], capture_output=True, text=True, timeout=120)
    assert str(size) in listing.stdout
