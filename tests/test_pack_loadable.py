"""What `pack` writes must be what llamafile 0.8.4 can load: the whole GGUF header checked
(gguf-py's GGUFReader as the independent oracle), `.args` under 0.8.4's rules (one
argument per line; cosmopolitan's LoadZipArgs), ZIP64 read by zipfile and Info-ZIP at
the 4 GiB boundaries, clean errors for unwritable outputs and undecodable names."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from pylmserv.app.pack import U32, pack
from pylmserv.core.errors import UsageError, VerificationError
from pylmserv.core.gguf import check_layout
from tests.conftest import run_cli
from tests.test_gguf import write_gguf
from tests.test_pack import gguf_header, make_gguf, make_llamafile


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _info(name="w", dims=(64,), ttype=24, offset=0) -> bytes:
    return _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ttype, offset)


# case -> (file, who says it cannot load): gguf-py's GGUFReader where it refuses too,
# else the rule's source in llamafile 0.8.4's ggml.c (gguf_init_from_file) or the spec.
BROKEN = {
    "only-the-magic": (b"GGUF" + struct.pack("<I", 3) + os.urandom(4000), "gguf-py"),
    "data-truncated": (gguf_header(4096) + b"\0" * 100, "gguf-py"),
    "unknown-type": (gguf_header(0, tensors=[_info(ttype=99)]) + b"\0" * 64, "gguf-py"),
    "duplicate-tensor": (gguf_header(0, tensors=[_info(), _info(offset=64)]) + b"\0" * 200, "gguf-py"),
    "partial-block": (gguf_header(0, tensors=[_info(dims=(33,), ttype=2)]) + b"\0" * 64, "gguf-py"),
    "bad-alignment": (gguf_header(64, kv=[("general.alignment", 4, struct.pack("<I", 48))]) + b"\0" * 64, "gguf-py"),
    "five-dims": (gguf_header(0, tensors=[_info(dims=(2, 2, 2, 2, 4))]) + b"\0" * 64, "ggml.c: n_dims <= GGML_MAX_DIMS"),
    "no-dims": (gguf_header(0, tensors=[_info(dims=())]) + b"\0" * 64, "ggml_new_tensor asserts n_dims >= 1"),
    "misaligned-offset": (gguf_header(0, tensors=[_info(offset=8)]) + b"\0" * 200, "GGUF spec: aligned offsets"),
    "metadata-truncated": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string("general.name")
                           + struct.pack("<IQ", 8, 1 << 20), "ggml.c: failed to read key-value pairs"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_pack_refuses_models_llamafile_cannot_load(tmp_path, case):
    lf = tmp_path / "lf"
    make_llamafile(lf, 2001)
    model = tmp_path / "m.gguf"
    data, oracle = BROKEN[case]
    model.write_bytes(data)
    if oracle == "gguf-py":
        import gguf

        with pytest.raises(Exception):  # the independent reader refuses it too
            r = gguf.GGUFReader(str(model))
            for t in r.tensors:
                if t.data.nbytes != t.n_bytes:
                    raise ValueError("short tensor")
    with pytest.raises(UsageError, match="is not a GGUF model llamafile can load"):
        pack(model, lf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tensors, pad", [(1, 0), (3, 4096), (7, 1 << 16)])
def test_whole_header_check_agrees_with_gguf_reader_on_real_files(tmp_path, tensors, pad):
    import gguf

    path = write_gguf(tmp_path / "m.gguf", tensors=tensors, pad=pad)
    header = check_layout(path)
    reader = gguf.GGUFReader(str(path))
    assert header.tensor_count == len(reader.tensors)
    # Cut one byte off the last tensor's data: both must now refuse.
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(VerificationError, match="runs past the end"):
        check_layout(path)


BAD_ARGS = {
    "line-break": ("a\nb", "line break"),
    "carriage-return": ("a\rb", "carriage return"),
    "nul": ("a\x00b", "NUL"),
    "empty": ("", "empty"),
    "dots": ("...", "user's own arguments"),
    "model-short": ("-m", "replace the packed model"),
    "model-long": ("--model=/x.gguf", "replace the packed model"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_args_that_llamafile_0_8_4_would_lose_or_misread_are_refused(tmp_path, case):
    arg, needle = BAD_ARGS[case]
    lf, model = tmp_path / "lf", tmp_path / "m.gguf"
    make_llamafile(lf, 2001)
    make_gguf(model, 3000)
    with pytest.raises(UsageError, match=needle):
        pack(model, lf, tmp_path / "out", args=["--ctx-size", "64", arg])
    assert not (tmp_path / "out").exists()


def test_args_are_one_per_line_literally(tmp_path):
    """0.8.4 does not parse .args like a shell: spaces, quotes and # stay in the argument."""
    lf, model = tmp_path / "lf", tmp_path / "m.gguf"
    make_llamafile(lf, 2001)
    make_gguf(model, 3000)
    args = ["--prompt", "say \"hi\" # not a comment", "--temp", " 0.5 ", "\u00e9t\u00e9"]
    pack(model, lf, tmp_path / "out", args=args)
    with zipfile.ZipFile(tmp_path / "out") as z:
        lines = z.read(".args").decode().split("\n")
    assert lines == ["-m", "/zip/m.gguf", *args, "...", ""]


def test_undecodable_model_name_is_a_clean_error(tmp_path, home):
    lf = tmp_path / "lf"
    make_llamafile(lf, 2001)
    odd = os.fsencode(str(tmp_path)) + b"/m\xff.gguf"
    make_gguf(Path(os.fsdecode(odd)), 3000)
    proc = subprocess.run([*_cli(), "pack", odd, "--llamafile", str(lf), "-o", str(tmp_path / "out")],
                          capture_output=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "not valid UTF-8" in err and "Traceback" not in err, err


def _cli():
    import sys
    return [sys.executable, "-m", "pylmserv"]


@pytest.mark.parametrize("where", ["parent-is-a-file", "under-proc"])
def test_unwritable_output_is_a_clean_error(tmp_path, where):
    lf, model = tmp_path / "lf", tmp_path / "m.gguf"
    make_llamafile(lf, 2001)
    make_gguf(model, 3000)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out" if where == "parent-is-a-file" else Path("/proc/pylmserv-test/out")
    proc = run_cli("pack", model, "--llamafile", lf, "-o", out)
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _sparse_gguf(path: Path, size: int) -> None:
    header = gguf_header(1)
    with open(path, "wb") as f:
        f.write(gguf_header(size - len(header)))
        f.truncate(size)
        f.seek(size - 8)
        f.write(b"tail-end")


@pytest.mark.slow  # three sparse 4 GiB copies: ~80 s on 2 cores
@pytest.mark.parametrize("size", [U32 - 1, U32, U32 + 1])
def test_zip64_at_the_4gib_boundary_read_by_zipfile_and_unzip(tmp_path, size):
    """Sizes one below, at and one above 0xFFFFFFFF (the ZIP64 marker value itself)."""
    lf, model = tmp_path / "lf", tmp_path / "m.gguf"
    make_llamafile(lf, 2001)
    _sparse_gguf(model, size)
    out = tmp_path / "out"
    pack(model, lf, out, verify="none")
    with zipfile.ZipFile(out) as z:
        info = z.getinfo("m.gguf")
        assert info.file_size == size
        with z.open("m.gguf") as member:
            member.seek(size - 8)
            assert member.read() == b"tail-end"
        assert z.read(".args") == b"-m\n/zip/m.gguf\n...\n"
    listing = subprocess.run([shutil.which("unzip"), "-lv", str(out)], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and str(size) in listing.stdout, listing.stdout + listing.stderr
    check = subprocess.run([shutil.which("unzip"), "-t", str(out), ".args"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "No errors detected" in check.stdout, check.stdout + check.stderr
