"""`pylmserv pack` against real zips: prefix bytes of odd lengths, existing entries (with
absolute and with zip-relative offsets), checked with Python's zipfile, Debian's
`unzip -t`, alignment read back from the local headers, and byte-for-byte contents."""
from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from pylmserv.core.errors import PylmservError, UsageError
from pylmserv.app.pack import pack
from tests.conftest import run_cli

UNZIP = shutil.which("unzip")


def make_llamafile(path: Path, prefix_len: int, relative_offsets: bool = False) -> dict:
    """An APE-shaped file: `prefix_len` bytes of 'executable', then a ZIP with entries.

    relative_offsets=False builds the zip and then prepends the prefix with `zip -A`-style
    absolute offsets (what cosmocc's tools produce); True appends with Python's zipfile,
    whose offsets are relative to the start of the zip."""
    prefix = (b"MZqFpD='\n#!/bin/sh\nexec echo llamafile\n" + bytes(range(256)) * (prefix_len // 256 + 1))[:prefix_len]
    entries = {"llamafile/version.txt": b"0.8.4\n", "usr/share/zoneinfo/UTC": os.urandom(700),
               "big/deflated.bin": b"abc" * 5000}
    if relative_offsets:
        path.write_bytes(prefix)
        with zipfile.ZipFile(path, "a") as z:
            for name, data in entries.items():
                z.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name.startswith("big") else zipfile.ZIP_STORED)
    else:
        zpath = path.with_suffix(".zip")
        with zipfile.ZipFile(zpath, "w") as z:
            for name, data in entries.items():
                z.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name.startswith("big") else zipfile.ZIP_STORED)
        path.write_bytes(prefix + zpath.read_bytes())
        subprocess.run(["zip", "-qA", str(path)], check=True, timeout=60)  # make offsets absolute
    path.chmod(0o755)
    return entries


def gguf_header(n_bytes: int, kv=(), tensors=None, alignment: int = 32) -> bytes:
    """A GGUF v3 header, padded to `alignment`: metadata `kv` (key, type, packed value)
    and one I8 tensor of `n_bytes` elements at offset 0 (or `tensors`: raw tensor infos)."""
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    infos = tensors if tensors is not None else [string("w") + struct.pack("<IQIQ", 1, n_bytes, 24, 0)]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kv))
    head += b"".join(string(k) + struct.pack("<I", t) + v for k, t, v in kv) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment)


def make_gguf(path: Path, size: int) -> bytes:
    """A real GGUF of exactly `size` bytes: header + one I8 tensor of random bytes."""
    header_len = len(gguf_header(1))
    data = gguf_header(size - header_len) + os.urandom(size - header_len)
    path.write_bytes(data)
    return data


def local_data_offset(blob: bytes, header_offset: int) -> int:
    sig, *_rest = struct.unpack_from("<4s", blob, header_offset)
    assert sig == b"PK\x03\x04"
    name_len, extra_len = struct.unpack_from("<HH", blob, header_offset + 26)
    return header_offset + 30 + name_len + extra_len


def unzip_test(path: Path) -> str:
    proc = subprocess.run([UNZIP, "-t", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No errors detected" in proc.stdout
    return proc.stdout


@pytest.mark.parametrize("prefix_len,relative", [(1, False), (4097, False), (65535, True), (65537, False), (12345, True)])
def test_pack_keeps_prefix_and_entries_and_aligns(tmp_path, prefix_len, relative):
    lf = tmp_path / "llamafile"
    old_entries = make_llamafile(lf, prefix_len, relative)
    original = lf.read_bytes()
    model = tmp_path / "tiny.gguf"
    model_bytes = make_gguf(model, 300_001)
    extra = tmp_path / "notes.txt"
    extra.write_bytes(b"hello\n")
    out = tmp_path / "out" / "packed.llamafile"

    result = pack(model, lf, out, extra_files=[extra], args=["--ctx-size", "2048", "--temp", "0.5"])

    blob = out.read_bytes()
    assert blob[:prefix_len] == original[:prefix_len]  # the executable prefix is untouched
    assert os.stat(out).st_mode & 0o111 == 0o111
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
        names = z.namelist()
        assert names == list(old_entries) + ["tiny.gguf", "notes.txt", ".args"]
        for name, data in old_entries.items():
            assert z.read(name) == data
        assert z.read("tiny.gguf") == model_bytes
        assert z.read("notes.txt") == b"hello\n"
        assert z.read(".args") == b"-m\n/zip/tiny.gguf\n--ctx-size\n2048\n--temp\n0.5\n...\n"
        for info in z.infolist():
            if info.filename in ("tiny.gguf", "notes.txt", ".args"):
                assert info.compress_type == zipfile.ZIP_STORED
                start = local_data_offset(blob, info.header_offset)
                assert start % 65536 == 0, (info.filename, start)
                assert blob[start:start + info.file_size] == z.read(info.filename)
    assert [e.data_offset % 65536 for e in result.entries] == [0, 0, 0]
    assert result.kept_entries == 3 and not result.zip64 and result.warnings == []
    assert UNZIP, "Debian unzip is needed (scripts/setup-dev.sh installs it)"
    unzip_test(out)
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp files left


@pytest.mark.parametrize("align", [1, 4096, 65536, 1 << 17, 1 << 21])
def test_pack_alignments_including_gaps_beyond_extra_field(tmp_path, align):
    # align > 64 KiB cannot be padded inside one extra field: zero bytes go before the header
    lf = tmp_path / "lf"
    make_llamafile(lf, 4099)
    model = tmp_path / "m.gguf"
    data = make_gguf(model, 70_000)
    out = tmp_path / "o"
    pack(model, lf, out, align=align)
    blob = out.read_bytes()
    with zipfile.ZipFile(out) as z:
        info = z.getinfo("m.gguf")
        start = local_data_offset(blob, info.header_offset)
        assert start % align == 0
        assert blob[start:start + len(data)] == data
        assert z.testzip() is None
    unzip_test(out)


def test_pack_repack_replaces_args_and_model(tmp_path):
    lf = tmp_path / "lf"
    make_llamafile(lf, 333)
    model = tmp_path / "m.gguf"
    make_gguf(model, 10_000)
    first = tmp_path / "first"
    pack(model, lf, first, args=["--one"])
    new_data = make_gguf(model, 20_000)
    second = tmp_path / "second"
    result = pack(model, first, second, args=["--two"])
    with zipfile.ZipFile(second) as z:
        assert z.namelist().count("m.gguf") == 1 and z.namelist().count(".args") == 1
        assert z.read("m.gguf") == new_data
        assert z.read(".args") == b"-m\n/zip/m.gguf\n--two\n...\n"
    assert any("replaced 2 existing entries" in w for w in result.warnings)
    unzip_test(second)


def test_pack_cli_json_and_exec_bit(tmp_path):
    lf = tmp_path / "lf"
    make_llamafile(lf, 77)
    model = tmp_path / "m.gguf"
    make_gguf(model, 5000)
    out = tmp_path / "packed"
    proc = run_cli("pack", model, "--llamafile", lf, "-o", out, "--arg", "--host", "--arg", "0.0.0.0", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    doc = json.loads(proc.stdout)
    assert doc["args"] == ["-m", "/zip/m.gguf", "--host", "0.0.0.0", "..."]
    assert [e["name"] for e in doc["entries"]] == ["m.gguf", ".args"]
    assert all(e["data_offset"] % 65536 == 0 for e in doc["entries"])
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o111


# -- bad input: one clear line, non-zero exit, nothing at -o -----------------------

def _inputs(tmp_path):
    lf = tmp_path / "lf"
    make_llamafile(lf, 100)
    model = tmp_path / "m.gguf"
    make_gguf(model, 5000)
    return lf, model


def test_pack_rejects_non_gguf_model(tmp_path):
    lf, _ = _inputs(tmp_path)
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x00\x01not a gguf at all")
    out = tmp_path / "out"
    proc = run_cli("pack", bad, "--llamafile", lf, "-o", out)
    assert proc.returncode == 2
    assert "is not a GGUF model" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_pack_rejects_binary_that_is_not_a_zip(tmp_path):
    _, model = _inputs(tmp_path)
    exe = tmp_path / "plain-elf"
    exe.write_bytes(b"\x7fELF" + os.urandom(50_000))
    out = tmp_path / "out"
    proc = run_cli("pack", model, "--llamafile", exe, "-o", out)
    assert proc.returncode == 2
    assert "is not a llamafile" in proc.stderr and "hint:" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(["lf", "lf.zip", "m.gguf", "plain-elf"])


@pytest.mark.parametrize("align", ["3", "0", "65535", "-4096"])
def test_pack_rejects_align_not_power_of_two(tmp_path, align):
    lf, model = _inputs(tmp_path)
    out = tmp_path / "out"
    proc = run_cli("pack", model, "--llamafile", lf, "-o", out, "--align", align)
    assert proc.returncode == 2
    assert "not a power of two" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_pack_failure_keeps_existing_output(tmp_path):
    lf, _ = _inputs(tmp_path)
    out = tmp_path / "out"
    out.write_bytes(b"previous good llamafile")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML old format")
    with pytest.raises(UsageError):
        pack(bad, lf, out)
    assert out.read_bytes() == b"previous good llamafile"


def _pack_past_file_size_limit(tmp_path, killed: bool):
    """`pylmserv pack` of a 3 MB model in a child whose files may not exceed 1 MB
    (RLIMIT_FSIZE). Python ignores SIGXFSZ, so the write fails with EFBIG (like ENOSPC);
    with `killed` the child restores the default action and the kernel kills it mid-write.
    Returns (the finished child, the llamafile, the model, the output path)."""
    import resource
    import sys

    lf, _ = _inputs(tmp_path)
    model = tmp_path / "big.gguf"
    make_gguf(model, 3_000_000)
    out_dir = tmp_path / "outdir"
    out_dir.mkdir()
    out = out_dir / "packed"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    child = (f"import runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.{'SIG_DFL' if killed else 'SIG_IGN'}); "
             "sys.argv = ['pylmserv'] + sys.argv[1:]; runpy.run_module('pylmserv', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", child, "pack", str(model), "--llamafile", str(lf), "-o", str(out)],
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    return proc, lf, model, out


def test_pack_full_disk_leaves_nothing(tmp_path):
    """A write that fails for lack of space (RLIMIT_FSIZE: EFBIG, like ENOSPC) leaves no output."""
    proc, _, _, out = _pack_past_file_size_limit(tmp_path, killed=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: cannot write") and "File too large" in proc.stderr
    assert "hint: Free space" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_pack_rejects_line_break_in_arg_and_name_clash(tmp_path):
    lf, model = _inputs(tmp_path)
    with pytest.raises(UsageError, match="line break"):
        pack(model, lf, tmp_path / "o", args=["a\nb"])
    other = tmp_path / "sub"
    other.mkdir()
    clash = other / "m.gguf"
    clash.write_bytes(b"x")
    with pytest.raises(UsageError, match="share the name"):
        pack(model, lf, tmp_path / "o", extra_files=[clash])
    assert not (tmp_path / "o").exists()


def test_pack_default_llamafile_missing_is_clear(tmp_path, home):
    _, model = _inputs(tmp_path)
    proc = run_cli("pack", model, "-o", tmp_path / "o")
    assert proc.returncode != 0
    assert "no llamafile built by pylmserv" in proc.stderr and "--llamafile" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pack_default_llamafile_is_the_built_one(tmp_path, home):
    lf, model = _inputs(tmp_path)
    # the layout `pylmserv build llamafile` installs: bin/llamafile-<backend>/<key>/ + `current` link
    prefix = home / "bin" / "llamafile-cpu" / "0123abcd"
    prefix.mkdir(parents=True)
    shutil.copy2(lf, prefix / "llamafile")
    (prefix.parent / "current").symlink_to(prefix.name)
    out = tmp_path / "o"
    proc = run_cli("pack", model, "-o", out)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(out) as z:
        assert "llamafile/version.txt" in z.namelist() and "m.gguf" in z.namelist()


def test_pack_api_errors_are_pylmserv_errors(tmp_path):
    lf, model = _inputs(tmp_path)
    with pytest.raises(PylmservError):
        pack(model, tmp_path / "missing", tmp_path / "o")


# -- the verifier itself catches corruption ---------------------------------------

@pytest.mark.parametrize("mode", ["full", "sample"])
def test_pack_verifier_detects_corrupted_data(tmp_path, mode):
    from pylmserv.core.errors import VerificationError
    from pylmserv.app.pack import verify_packed

    lf, _ = _inputs(tmp_path)
    model = tmp_path / "big.gguf"
    make_gguf(model, 12 << 20)  # above the sample mode's whole-file threshold
    out = tmp_path / "o"
    result = pack(model, lf, out, verify=mode)
    entries = result.entries
    verify_packed(out, entries, 65536, mode=mode, sources={"big.gguf": model})  # intact: passes
    e = entries[0]
    with open(out, "r+b") as f:  # flip one byte at the start of the model's data
        f.seek(e.data_offset + 10)
        b = f.read(1)
        f.seek(e.data_offset + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(VerificationError):
        verify_packed(out, entries, 65536, mode=mode, sources={"big.gguf": model})
    with pytest.raises(VerificationError, match="aligned"):
        verify_packed(out, entries, 1 << 20, mode="none")  # 64 KiB-aligned data is not 1 MiB-aligned


def test_pack_verify_modes_via_cli(tmp_path):
    lf, model = _inputs(tmp_path)
    for mode in ("sample", "full", "none"):
        out = tmp_path / f"o-{mode}"
        proc = run_cli("pack", model, "--llamafile", lf, "-o", out, "--verify", mode)
        assert proc.returncode == 0, proc.stderr
        unzip_test(out)
    proc = run_cli("pack", model, "--llamafile", lf, "-o", tmp_path / "x", "--verify", "bogus")
    assert proc.returncode == 2 and not (tmp_path / "x").exists()


def test_pack_real_full_disk_on_small_tmpfs(tmp_path):
    """ENOSPC from a real filesystem: a 2 MiB tmpfs (needs mount privileges; the
    RLIMIT_FSIZE test above covers unprivileged runs)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        lf, _ = _inputs(tmp_path)
        model = tmp_path / "m.gguf"
        make_gguf(model, 3_000_000)
        (mnt / "old.llamafile").write_bytes(b"the previous good file")
        cli = run_cli("pack", model, "--llamafile", lf, "-o", mnt / "old.llamafile")
        assert cli.returncode == 1, cli.stderr
        assert cli.stderr.startswith("error: cannot write") and "No space left on device" in cli.stderr
        assert "Traceback" not in cli.stderr
        assert sorted(p.name for p in mnt.iterdir()) == ["old.llamafile"]
        assert (mnt / "old.llamafile").read_bytes() == b"the previous good file"
        # The library raises the one disk-full error of the family (as fetch does).
        from pylmserv.core.errors import DiskSpaceError

        with pytest.raises(DiskSpaceError, match="No space left on device"):
            pack(model, lf, mnt / "old.llamafile")
        assert sorted(p.name for p in mnt.iterdir()) == ["old.llamafile"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def test_killed_pack_leaves_a_partial_that_the_next_run_removes(tmp_path):
    """A pack killed mid-write (SIGXFSZ's default action: the kernel kills the process at
    the file size limit) cannot clean up; the next pack into that directory does, and
    leaves alone what is not a dead pack's partial."""
    import signal

    from pylmserv.core.fsutil import process_stamp

    proc, lf, model, out = _pack_past_file_size_limit(tmp_path, killed=True)
    out_dir = out.parent
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr  # killed, no cleanup ran
    [left] = out_dir.iterdir()
    assert left.name.startswith(".packed.pylmserv-") and left.name.endswith(".part")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = out_dir / f".packed.pylmserv-{process_stamp(sleeper.pid)}.part"  # a live writer's
        live.write_bytes(b"busy")
        reused = out_dir / f".packed.pylmserv-{sleeper.pid}-1.part"  # a live pid, another start time
        reused.write_bytes(b"old")
        mine = out_dir / ".packed.user-notes.part"  # not a pylmserv name
        mine.write_bytes(b"keep")
        pack(model, lf, out)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["packed", live.name, mine.name])
    assert zipfile.ZipFile(out).read("big.gguf") == model.read_bytes()
