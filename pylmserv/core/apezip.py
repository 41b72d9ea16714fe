"""Aligned STORED entries appended to an APE/ZIP executable (a llamafile): pure Python.

A llamafile is an APE executable that is also a ZIP archive. Writing keeps every byte of
the input up to its central directory (the executable prefix and existing entries), then
appends each file as a STORED entry whose data starts on an `align` boundary (so it can be
mmap()ed straight out of the executable), and writes a new central directory (ZIP64 where
sizes or offsets pass 4 GiB).

One streamed pass over each input (CRC-32 computed while copying), constant memory, the
output written to a temp file beside the output and renamed only after it has been
reopened and verified: a failure leaves nothing at the output path.

`app/pack.py` (models + `.args`) and the llamafile builder (GPU modules) both use it.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from .errors import DiskSpaceError, PylmservError, UsageError, VerificationError, ZipFormatError
from .fsutil import remove_stale, stamped_name, unlink_missing_ok
from .log import get_logger

log = get_logger("pylmserv.pack")

try:  # zlib-ng's CRC-32 uses PCLMULQDQ/VPCLMULQDQ: ~20x zlib's, so the checksum is ~free
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - same result, just slower
    from zlib import crc32

DEFAULT_ALIGN = 65536
CHUNK = 1 << 20  # copy buffer: constant memory whatever the model size
WINDOWS_EXE_LIMIT = 1 << 32  # Windows refuses to run executables of 4 GiB or more

# ZIP record signatures and sizes (APPNOTE.TXT 4.3)
LOCAL_SIG = b"PK\x03\x04"
CENTRAL_SIG = b"PK\x01\x02"
EOCD_SIG = b"PK\x05\x06"
ZIP64_EOCD_SIG = b"PK\x06\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
LOCAL_FMT = "<4sHHHHHIIIHH"  # 30 bytes
CENTRAL_FMT = "<4sHHHHHHIIIHHHHHII"  # 46 bytes
EOCD_FMT = "<4sHHHHIIH"  # 22 bytes
ZIP64_EOCD_FMT = "<4sQHHIIQQQQ"  # 56 bytes
ZIP64_LOCATOR_FMT = "<4sIQI"  # 20 bytes
ZIP64_EXTRA_ID = 0x0001
# Padding lives in an extra field with a private id; readers skip ids they don't know.
PAD_EXTRA_ID = 0x6C61
U16 = 0xFFFF
U32 = 0xFFFFFFFF
VERSION_ZIP64 = 45
VERSION_STORED = 20
DOS_DATE_1980 = (0 << 11, (0 << 9) | (1 << 5) | 1)  # (time, date): 1980-01-01, reproducible


@dataclass(frozen=True)
class PackedEntry:
    name: str
    header_offset: int
    data_offset: int
    size: int
    crc32: int


@dataclass
class _Zip:
    """Where the input's ZIP parts are, and its central directory records (raw)."""

    cd_start: int  # absolute offset of the central directory in the file
    records: List[Tuple[str, bytes]]  # (name, raw central record with offsets made absolute)


def embed_files(binary: Union[str, Path], files: Sequence[Tuple[str, Union[str, Path]]],
                output: Optional[Union[str, Path]] = None, align: int = DEFAULT_ALIGN) -> List[PackedEntry]:
    """Add `files` ((name in the zip, path) pairs) to an APE/zip binary as aligned STORED
    entries, replacing same-named ones; in place (atomically) unless `output` is given.
    The llamafile builder embeds ggml-cuda.so / ggml-rocm.so with it."""
    check_align(align)
    binary = Path(binary)
    output = Path(output) if output is not None else binary
    files = [(name, Path(p)) for name, p in files]
    for _, p in files:
        check_readable(p, "file")
    check_readable(binary, "binary")
    return write_archive(binary, output, files, [], align, "full")[1]


def write_archive(llamafile: Path, output: Path, files, blobs, align: int, verify: bool):
    """Copy `llamafile` up to its central directory, append `files` then `blobs` aligned,
    write the new central directory; temp file + verify + rename. Returns
    (size, entries, kept_entries, replaced, zip64)."""
    zip_info = read_central_directory(llamafile)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The temp name carries this process's pid and start time: a run killed before it
    # could clean up leaves a file that the next run into this directory removes.
    prefix = f".{output.name}."
    for stale in remove_stale(output.parent, prefix, ".part"):
        log.info("removed %s, left by a pack that was killed", stale.name)
    tmp = output.parent / stamped_name(prefix, ".part")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise PylmservError(f"{tmp} exists: another pack by this process is writing {output}",
                            hint="Write each output from one pack at a time.") from None
    except OSError as exc:
        raise PylmservError(f"cannot write {output}: {exc.strerror or exc}",
                            hint="Check the path and permissions.") from None
    try:
        with os.fdopen(fd, "w+b") as out:
            taken = {name for name, _ in files} | {name for name, _ in blobs}
            kept = [(n, r) for n, r in zip_info.records if n not in taken]
            replaced = len(zip_info.records) - len(kept)
            with open(llamafile, "rb") as src:
                _copy_range(src, out, zip_info.cd_start)
            entries = [_append_file(out, name, path, align) for name, path in files]
            entries += [_append_bytes(out, name, data, align) for name, data in blobs]
            zip64 = _write_central_directory(out, kept, entries)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        verify_packed(tmp, entries, align, mode=verify, sources=dict(files))
        mode = stat.S_IMODE(os.stat(llamafile).st_mode) | 0o755
        os.chmod(tmp, mode)
        os.replace(tmp, output)
    except OSError as exc:
        unlink_missing_ok(tmp)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise DiskSpaceError(f"cannot write {output}: {os.strerror(exc.errno)}",
                                hint="Free space on that filesystem (it needs about the size of the llamafile "
                                     "plus the model) or write -o elsewhere.") from None
        raise PylmservError(f"cannot write {output}: {exc.strerror or exc}", hint="Check the path and permissions.") from None
    except BaseException:
        unlink_missing_ok(tmp)
        raise
    return size, entries, len(kept), replaced, zip64


def read_central_directory(path: Union[str, Path]) -> _Zip:
    """Find the ZIP inside an APE/zip file; raise a clear error when there is none."""
    path = Path(path)
    hint = "Pass a llamafile binary (an APE executable that is also a ZIP), e.g. one built by `pylmserv build llamafile`."
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        file_size = f.tell()
        tail_len = min(file_size, 22 + U16 + 20)
        f.seek(file_size - tail_len)
        tail = f.read(tail_len)
        pos = tail.rfind(EOCD_SIG)
        while pos >= 0 and pos + 22 > len(tail):
            pos = tail.rfind(EOCD_SIG, 0, pos)
        if pos < 0:
            raise ZipFormatError(f"{path} is not a llamafile: no ZIP end-of-central-directory record", hint=hint)
        eocd_at = file_size - tail_len + pos
        _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, _clen = struct.unpack_from(EOCD_FMT, tail, pos)
        if disk != 0 or cd_disk != 0 or n_disk != n_total:
            raise ZipFormatError(f"{path}: multi-disk ZIP archives are not supported", hint=hint)
        end_of_cd = eocd_at
        loc_at = eocd_at - 20
        if loc_at >= 0:
            f.seek(loc_at)
            loc = f.read(20)
            if len(loc) == 20 and loc[:4] == ZIP64_LOCATOR_SIG:
                _, _, z64_at, _ = struct.unpack(ZIP64_LOCATOR_FMT, loc)
                f.seek(z64_at)
                rec = f.read(56)
                if len(rec) < 56 or rec[:4] != ZIP64_EOCD_SIG:
                    # offsets relative to a zip that was prepended to: the record sits just before the locator
                    z64_at = loc_at - 56
                    f.seek(z64_at)
                    rec = f.read(56)
                if len(rec) == 56 and rec[:4] == ZIP64_EOCD_SIG:
                    fields = struct.unpack(ZIP64_EOCD_FMT, rec)
                    n_total, cd_size, cd_offset = fields[7], fields[8], fields[9]
                    end_of_cd = z64_at
        # Offsets may be relative to where the zip started (a zip prepended to): shift them.
        shift = end_of_cd - cd_size - cd_offset
        cd_start = cd_offset + shift
        if shift < 0 or cd_start < 0 or cd_size > file_size:
            raise ZipFormatError(f"{path}: corrupt ZIP central directory", hint=hint)
        f.seek(cd_start)
        cd = f.read(cd_size)
    records = _parse_central_records(cd, n_total, shift, path)
    return _Zip(cd_start=cd_start, records=records)


def verify_packed(path: Union[str, Path], entries: Iterable[PackedEntry], align: int, mode: str = "full",
                  sources: Optional[dict] = None) -> None:
    """Reopen a packed file: central directory readable, each new entry STORED and aligned;
    contents per `mode` (full | sample | none; see pack()). `sources`: name -> source path."""
    sources = sources or {}
    path = Path(path)
    zip_info = read_central_directory(path)
    central = {name: rec for name, rec in zip_info.records}
    with open(path, "rb", buffering=0) as f:  # unbuffered: _regions moves the fd offset with lseek
        for e in entries:
            rec = central.get(e.name)
            if rec is None:
                raise VerificationError(f"{path}: entry {e.name} missing from the central directory")
            hdr_off = _record_header_offset(rec)
            if hdr_off != e.header_offset:
                raise VerificationError(f"{path}: entry {e.name} points at {hdr_off}, written at {e.header_offset}")
            f.seek(hdr_off)
            local = f.read(30)
            if len(local) < 30 or local[:4] != LOCAL_SIG:
                raise VerificationError(f"{path}: no local header for {e.name} at offset {hdr_off}")
            fields = struct.unpack(LOCAL_FMT, local)
            method, crc, name_len, extra_len = fields[3], fields[6], fields[9], fields[10]
            name = f.read(name_len).decode("utf-8")
            data_off = hdr_off + 30 + name_len + extra_len
            if name != e.name or method != 0 or crc != e.crc32:
                raise VerificationError(f"{path}: local header of {e.name} does not match what was written")
            if data_off != e.data_offset or data_off % align:
                raise VerificationError(f"{path}: data of {e.name} at {data_off} is not {align}-byte aligned")
            if mode == "full" or (mode == "sample" and (e.size <= SAMPLE_FULL_BELOW or e.name not in sources)):
                crc = _crc_of_range(f, data_off, data_off + e.size, path, e.name)
                if crc != e.crc32:
                    raise VerificationError(f"{path}: CRC-32 of {e.name} does not match its source")
            elif mode == "sample":
                _compare_windows(f, data_off, Path(sources[e.name]), e.size, path, e.name)


SAMPLE_FULL_BELOW = 8 << 20  # entries up to this size are always re-read whole
SAMPLE_WINDOW = 64 << 10
SAMPLE_WINDOWS = 16


def _compare_windows(f, data_off: int, source: Path, size: int, path: Path, name: str) -> None:
    """Compare windows of the written entry with its source: start, end, and evenly between."""
    step = max(1, (size - SAMPLE_WINDOW) // (SAMPLE_WINDOWS - 1))
    starts = sorted({min(i * step, size - SAMPLE_WINDOW) for i in range(SAMPLE_WINDOWS)})
    with open(source, "rb", buffering=0) as src:
        for at in starts:
            want = os.pread(src.fileno(), SAMPLE_WINDOW, at)
            got = os.pread(f.fileno(), SAMPLE_WINDOW, data_off + at)
            if got != want:
                raise VerificationError(f"{path}: {name} differs from its source at byte {at}",
                                        hint="The disk or filesystem corrupted the write; check it and pack again.")


# -- checks on the inputs ---------------------------------------------------------------

def check_align(align: int) -> None:
    if not isinstance(align, int) or align < 1 or align & (align - 1):
        raise UsageError(f"--align {align} is not a power of two",
                         hint="Use a power of two such as 4096 or 65536 (the default; llamafile's page alignment).")


def check_readable(path: Path, what: str) -> None:
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}", hint="Check the path (it must be a regular file).")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} not readable: {path}", hint="Check its permissions.")


# -- writing --------------------------------------------------------------------------

def _copy_range(src, out, length: int) -> None:
    """Copy the first `length` bytes of src to out (in the kernel where it can)."""
    src.seek(0)
    out.flush()
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), out.fileno(), length - done, done, done)
                if n == 0:
                    break
                done += n
                out.seek(done)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise
            done = 0  # fall back to plain reads/writes below
            out.seek(0)
            out.truncate()
    src.seek(done)
    while done < length:
        chunk = src.read(min(CHUNK, length - done))
        if not chunk:
            raise ZipFormatError("the llamafile shrank while it was being read", hint="Do not modify it while packing.")
        out.write(chunk)
        done += len(chunk)


def _padding(header_at: int, name_len: int, extra_len: int, align: int) -> Tuple[int, int]:
    """(gap, pad): zero bytes before the local header, and a padding extra field of `pad`
    bytes (4-byte field header included) so that the data starts on `align`."""
    pad = -(header_at + 30 + name_len + extra_len) % align
    if pad == 0 or 4 <= pad <= U16 - extra_len:
        return 0, pad
    if pad < 4:  # too small for an extra field: skip a few bytes before the header instead
        return pad, 0
    gap = pad - (U16 - extra_len)  # too large for one extra field (align > 64 KiB)
    return gap, pad - gap


def _local_header(name: bytes, size: int, crc: int, extra: bytes) -> bytes:
    big = size >= U32
    return struct.pack(LOCAL_FMT, LOCAL_SIG, VERSION_ZIP64 if big else VERSION_STORED, 0x0800, 0,
                       DOS_DATE_1980[0], DOS_DATE_1980[1], crc, U32 if big else size, U32 if big else size,
                       len(name), len(extra)) + name + extra


def _begin_entry(out, name: str, size: int, align: int) -> Tuple[int, int, int]:
    """Write the local header (CRC patched later); return (header_offset, data_offset, crc_pos)."""
    raw = name.encode("utf-8")
    z64 = struct.pack("<HHQQ", ZIP64_EXTRA_ID, 16, size, size) if size >= U32 else b""
    at = out.tell()
    gap, pad = _padding(at, len(raw), len(z64), align)
    if gap:
        out.write(b"\0" * gap)
        at += gap
    extra = z64 + (struct.pack("<HH", PAD_EXTRA_ID, pad - 4) + b"\0" * (pad - 4) if pad else b"")
    out.write(_local_header(raw, size, 0, extra))
    return at, out.tell(), at + 14


def _finish_entry(out, name: str, at: int, data_at: int, crc_pos: int, size: int, crc: int) -> PackedEntry:
    end = out.tell()
    out.seek(crc_pos)
    out.write(struct.pack("<I", crc))
    out.seek(end)
    return PackedEntry(name=name, header_offset=at, data_offset=data_at, size=size, crc32=crc)


def _append_file(out, name: str, path: Path, align: int) -> PackedEntry:
    with open(path, "rb", buffering=0) as src:  # unbuffered: _regions moves the fd offset with lseek
        size = os.fstat(src.fileno()).st_size
        at, data_at, crc_pos = _begin_entry(out, name, size, align)
        value = 0
        shrank = lambda: ZipFormatError(f"{path} shrank while it was being packed",  # noqa: E731
                                   hint="Do not modify it while packing.")
        for piece in _pieces(src, 0, size, shrank):
            if isinstance(piece, int):
                # A hole in a sparse input stays a hole in the output: seek, don't write zeros.
                value = _crc_zeros(piece, value)
                out.seek(piece, os.SEEK_CUR)
            else:
                value = crc32(piece, value)
                out.write(piece)
    log.debug("packed %s: %d bytes at %d", name, size, data_at)
    return _finish_entry(out, name, at, data_at, crc_pos, size, value)


def _crc_zeros(n: int, value: int) -> int:
    while n:
        step = min(CHUNK, n)
        value = crc32(_ZEROS[:step], value)
        n -= step
    return value


_ZEROS = memoryview(bytes(CHUNK))


def _crc_of_range(f, start: int, end: int, path: Path, name: str) -> int:
    """CRC-32 of f[start:end], reading only data regions (holes are zeros)."""
    crc = 0
    for piece in _pieces(f, start, end, lambda: VerificationError(f"{path}: {name} is truncated")):
        crc = _crc_zeros(piece, crc) if isinstance(piece, int) else crc32(piece, crc)
    return crc


def _pieces(f, start: int, end: int, short_read):
    """f[start:end] as hole lengths (int) and data chunks (a reused memoryview: use it at
    once); `short_read()` is the error raised when the file ends early."""
    view = memoryview(bytearray(CHUNK))
    for a, b, is_hole in _regions(f.fileno(), start, end):
        if is_hole:
            yield b - a
            continue
        f.seek(a)
        pos = a
        while pos < b:
            n = f.readinto(view[:min(CHUNK, b - pos)])
            if not n:
                raise short_read()
            yield view[:n]
            pos += n


def _regions(fd: int, start: int, size: int):
    """Yield (a, b, is_hole) covering [start, size): holes found with SEEK_HOLE/SEEK_DATA
    where the filesystem reports them, else one data region."""
    if not hasattr(os, "SEEK_DATA"):
        yield start, size, False
        return
    pos = start
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end
                yield pos, size, True
                return
            yield pos, size, False  # filesystem without hole support
            return
        data = min(data, size)
        if data > pos:
            yield pos, data, True
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole, False
        pos = hole


def _append_bytes(out, name: str, data: bytes, align: int) -> PackedEntry:
    at, data_at, crc_pos = _begin_entry(out, name, len(data), align)
    out.write(data)
    return _finish_entry(out, name, at, data_at, crc_pos, len(data), crc32(data))


def _central_record(e: PackedEntry) -> bytes:
    raw = e.name.encode("utf-8")
    z64_fields = []
    size_field = off_field = None
    # Sizes go into the ZIP64 extra too whenever the offset does: UnZip 6.00 decides which
    # extra fields to read from the previous entry's local sizes as well, and would read
    # an offset-only extra as a size after a ZIP64-sized entry.
    if e.size >= U32 or e.header_offset >= U32:
        z64_fields += [e.size, e.size]
        size_field = U32
    if e.header_offset >= U32:
        z64_fields.append(e.header_offset)
        off_field = U32
    extra = struct.pack("<HH", ZIP64_EXTRA_ID, 8 * len(z64_fields)) + struct.pack(f"<{len(z64_fields)}Q", *z64_fields) if z64_fields else b""
    version = VERSION_ZIP64 if z64_fields else VERSION_STORED
    ext_attr = (0o100644 << 16)  # a regular file, rw-r--r--, for unzip on Unix
    return struct.pack(CENTRAL_FMT, CENTRAL_SIG, (3 << 8) | version, version, 0x0800, 0,
                       DOS_DATE_1980[0], DOS_DATE_1980[1], e.crc32,
                       e.size if size_field is None else size_field, e.size if size_field is None else size_field,
                       len(raw), len(extra), 0, 0, 0, ext_attr,
                       e.header_offset if off_field is None else off_field) + raw + extra


def _write_central_directory(out, kept: List[Tuple[str, bytes]], entries: List[PackedEntry]) -> bool:
    cd_start = out.tell()
    for _, rec in kept:
        out.write(rec)
    for e in entries:
        out.write(_central_record(e))
    cd_end = out.tell()
    count = len(kept) + len(entries)
    cd_size = cd_end - cd_start
    zip64 = count >= U16 or cd_size >= U32 or cd_start >= U32 or any(e.size >= U32 or e.header_offset >= U32 for e in entries)
    if zip64:
        out.write(struct.pack(ZIP64_EOCD_FMT, ZIP64_EOCD_SIG, 44, (3 << 8) | VERSION_ZIP64, VERSION_ZIP64,
                              0, 0, count, count, cd_size, cd_start))
        out.write(struct.pack(ZIP64_LOCATOR_FMT, ZIP64_LOCATOR_SIG, 0, cd_end, 1))
    out.write(struct.pack(EOCD_FMT, EOCD_SIG, 0, 0, min(count, U16), min(count, U16),
                          min(cd_size, U32), min(cd_start, U32), 0))
    return zip64


# -- central directory records of the input -----------------------------------------

def _parse_central_records(cd: bytes, count: int, shift: int, path: Path) -> List[Tuple[str, bytes]]:
    records = []
    pos = 0
    for _ in range(count):
        if cd[pos:pos + 4] != CENTRAL_SIG or pos + 46 > len(cd):
            raise ZipFormatError(f"{path}: corrupt ZIP central directory (record {len(records)})",
                            hint="The llamafile is damaged; rebuild or re-download it.")
        f = struct.unpack_from(CENTRAL_FMT, cd, pos)
        name_len, extra_len, comment_len = f[10], f[11], f[12]
        end = pos + 46 + name_len + extra_len + comment_len
        raw = bytearray(cd[pos:end])
        name = bytes(raw[46:46 + name_len]).decode("utf-8" if f[3] & 0x0800 else "cp437")
        if shift:
            _shift_record_offset(raw, shift)
        records.append((name, bytes(raw)))
        pos = end
    return records


def _zip64_extra_slots(raw: bytes):
    """Yield (position, field) for the ZIP64 extra's 8-byte slots, in APPNOTE order."""
    f = struct.unpack_from(CENTRAL_FMT, raw, 0)
    name_len, extra_len = f[10], f[11]
    wanted = [k for k, v in (("usize", f[9]), ("csize", f[8]), ("offset", f[16])) if v == U32]
    pos, end = 46 + name_len, 46 + name_len + extra_len
    while pos + 4 <= end:
        hid, hlen = struct.unpack_from("<HH", raw, pos)
        if hid == ZIP64_EXTRA_ID:
            for i, key in enumerate(wanted):
                yield pos + 4 + 8 * i, key
            return
        pos += 4 + hlen


def _record_header_offset(raw: bytes) -> int:
    off = struct.unpack_from("<I", raw, 42)[0]
    if off != U32:
        return off
    for slot, key in _zip64_extra_slots(raw):
        if key == "offset":
            return struct.unpack_from("<Q", raw, slot)[0]
    raise ZipFormatError("corrupt ZIP64 central directory record (no offset)")


def _shift_record_offset(raw: bytearray, shift: int) -> None:
    off = struct.unpack_from("<I", raw, 42)[0]
    if off != U32:
        if off + shift >= U32:
            raise ZipFormatError("an entry of the input would need a ZIP64 offset after rebasing",
                            hint="Rebuild the llamafile so its ZIP offsets are absolute.")
        struct.pack_into("<I", raw, 42, off + shift)
        return
    for slot, key in _zip64_extra_slots(raw):
        if key == "offset":
            struct.pack_into("<Q", raw, slot, struct.unpack_from("<Q", raw, slot)[0] + shift)
