"""GGUF header checks: magic, version, sane counts, split-set completeness.

Reads only the header (magic, version, counts and the key/value section, streamed; array
values are skipped, not loaded), never the tensor data: a multi-GB model costs a few
reads. The `gguf` package's GGUFReader maps and indexes the whole file, which is more
than a post-download sanity check needs.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import VerificationError
from .record import Factory, Record

MAGIC = b"GGUF"
VERSIONS = (1, 2, 3)
MAX_TENSORS = 1 << 20  # real models have thousands; more means a corrupt header
MAX_KV = 1 << 16
MAX_STRING = 1 << 26  # one metadata string (chat templates are KBs)
MAX_ARRAY = 1 << 26  # elements in one metadata array (vocabularies ~ 256k)
SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# value type -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFHeader(Record):  # a Record, not a dataclass: `fetch` imports it (~4 M instructions a dataclass)
    __slots__ = ("version", "tensor_count", "kv_count", "metadata")
    _defaults = {"metadata": Factory(dict)}
    version: int
    tensor_count: int
    kv_count: int
    metadata: Dict[str, object]  # scalars and strings; arrays as None

    @property
    def architecture(self) -> Optional[str]:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def split_no(self) -> Optional[int]:
        value = self.metadata.get("split.no")
        return int(value) if isinstance(value, int) else None

    @property
    def split_count(self) -> Optional[int]:
        value = self.metadata.get("split.count")
        return int(value) if isinstance(value, int) else None


class _Reader:
    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise _bad(self.path, f"truncated header at byte {self.f.tell()}")
        return data

    def skip(self, n: int) -> None:
        pos = self.f.tell() + n
        if pos > self.size:
            raise _bad(self.path, f"a metadata value runs past the end of the file ({pos} > {self.size})")
        self.f.seek(pos)

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]


def _bad(path: Path, why: str) -> VerificationError:
    return VerificationError(f"{path.name} is not a valid GGUF model: {why}",
                             hint="The download is not a GGUF file (an error page?) or is damaged; "
                                  "check the URL and the pinned hash.")


def read_header(path: Path) -> GGUFHeader:
    """Parse and sanity-check the GGUF header of `path`; VerificationError if it is not one."""
    return _parse(Path(path), layout=False)


def check_layout(path: Path) -> GGUFHeader:
    """The whole header, as a loader reads it: metadata, then every tensor's info (unique
    name, 1..4 dimensions, a known type, an aligned offset) and its data inside the file.
    What `pack` requires before a model goes into a llamafile that must load it."""
    return _parse(Path(path), layout=True)


def _parse(path: Path, layout: bool) -> GGUFHeader:
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        if size < 8:
            raise _bad(path, f"only {size} bytes")
        magic = r.read(4)
        if magic != MAGIC:
            shown = magic.decode("latin-1").encode("unicode_escape").decode()
            looks = " (it looks like HTML)" if magic.lstrip().lower().startswith((b"<!", b"<h")) else ""
            raise _bad(path, f"magic is {shown!r}, not 'GGUF'{looks}")
        version = r.unpack("I")
        if version not in VERSIONS:
            raise _bad(path, f"unsupported GGUF version {version}")
        count_fmt = "I" if version == 1 else "Q"
        tensors = r.unpack(count_fmt)
        kvs = r.unpack(count_fmt)
        if tensors > MAX_TENSORS:
            raise _bad(path, f"implausible tensor count {tensors}")
        if kvs > MAX_KV:
            raise _bad(path, f"implausible metadata count {kvs}")
        metadata: Dict[str, object] = {}
        for _ in range(kvs):
            key = _read_string(r, count_fmt, limit=1 << 16)
            if key in metadata:
                raise _bad(path, f"metadata key {key!r} appears twice")
            vtype = r.unpack("I")
            metadata[key] = _read_value(r, vtype, count_fmt)
        # Each tensor info needs at least a name length, n_dims, a type and an offset.
        if r.f.tell() + tensors * (8 + 4 + 4 + 8) > size:
            raise _bad(path, f"{tensors} tensors cannot fit in {size} bytes")
        if layout:
            _check_tensors(r, tensors, count_fmt, metadata)
    return GGUFHeader(version, tensors, kvs, metadata)


# ggml type id -> (elements per block, bytes per block), as ggml.c / gguf-py define them.
GGML_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}
MAX_DIMS = 4  # GGML_MAX_DIMS


def _check_tensors(r: "_Reader", count: int, count_fmt: str, metadata: Dict[str, object]) -> None:
    """llamafile 0.8.4's gguf_init_from_file rules (its ggml.c: unique names, n_dims <= 4,
    elements a whole number of blocks, a u32 general.alignment) plus llama.cpp's loader's
    (every tensor's data inside the file) and the GGUF spec's aligned offsets."""
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise _bad(r.path, f"general.alignment {alignment!r} is not a power of two")
    seen = set()
    spans = []
    for _ in range(count):
        name = _read_string(r, count_fmt, limit=1 << 16)
        if name in seen:
            raise _bad(r.path, f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = r.unpack("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _bad(r.path, f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [r.unpack(count_fmt) for _ in range(n_dims)]
        ttype = r.unpack("I")
        offset = r.unpack("Q")
        if ttype not in GGML_TYPE_SIZES:
            raise _bad(r.path, f"tensor {name!r} has unknown type {ttype}")
        block, type_size = GGML_TYPE_SIZES[ttype]
        elements = 1
        for d in dims:
            elements *= d
        if elements >= 1 << 62:
            raise _bad(r.path, f"tensor {name!r} has an impossible shape {dims}")
        if elements % block:
            raise _bad(r.path, f"tensor {name!r}: {elements} elements are not a whole number of "
                               f"{block}-element blocks")
        if offset % alignment:
            raise _bad(r.path, f"tensor {name!r} data offset {offset} is not aligned to {alignment}")
        spans.append((offset, elements // block * type_size, name))
    data_start = -(-r.f.tell() // alignment) * alignment
    for offset, nbytes, name in spans:
        end = data_start + offset + nbytes
        if end > r.size:
            raise _bad(r.path, f"tensor {name!r} runs past the end of the file ({end} > {r.size} bytes)")


def _read_string(r: _Reader, count_fmt: str, limit: int = MAX_STRING) -> str:
    n = r.unpack(count_fmt)
    if n > limit or r.f.tell() + n > r.size:
        raise _bad(r.path, f"implausible string length {n}")
    return r.read(n).decode("utf-8", "replace")


def _read_value(r: _Reader, vtype: int, count_fmt: str):
    if vtype in _SCALARS:
        return r.unpack(_SCALARS[vtype])
    if vtype == _STRING:
        return _read_string(r, count_fmt)
    if vtype == _ARRAY:
        etype = r.unpack("I")
        n = r.unpack(count_fmt)
        if n > MAX_ARRAY:
            raise _bad(r.path, f"implausible array length {n}")
        if etype in _SCALARS:
            r.skip(n * struct.calcsize(_SCALARS[etype]))
        elif etype == _STRING:
            for _ in range(n):
                length = r.unpack(count_fmt)
                if length > MAX_STRING:
                    raise _bad(r.path, f"implausible string length {length}")
                r.skip(length)
        elif etype == _ARRAY:
            for _ in range(n):
                _read_value(r, _ARRAY, count_fmt)
        else:
            raise _bad(r.path, f"unknown array element type {etype}")
        return None
    raise _bad(r.path, f"unknown metadata value type {vtype}")


# -- split sets ------------------------------------------------------------------------

def split_info(filename: str):
    """(prefix, number, count) for `name-00001-of-00003.gguf`, else None."""
    m = SPLIT_RE.match(Path(filename).name)
    if not m:
        return None
    return m.group("prefix"), int(m.group("no")), int(m.group("count"))


def split_names(filename: str) -> List[str]:
    """All file names of the split set `filename` belongs to (itself if not split)."""
    info = split_info(filename)
    if info is None:
        return [Path(filename).name]
    prefix, _, count = info
    return [f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def check_split_set(paths: Sequence[Path]) -> List[GGUFHeader]:
    """Every shard present, a valid header each, and split.no/split.count consistent."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise VerificationError("empty split set")
    info = split_info(paths[0].name)
    if info is None:
        return [read_header(paths[0])]
    prefix, _, count = info
    expected = split_names(paths[0].name)
    names = [p.name for p in paths]
    missing = [n for n in expected if n not in names]
    if missing:
        raise VerificationError(f"split set {prefix} is incomplete: missing {', '.join(missing)}",
                                hint="Fetch the whole set (all -0000K-of-0000N.gguf files).")
    headers = []
    for i, name in enumerate(expected):
        path = paths[names.index(name)]
        h = read_header(path)
        # llama.cpp's gguf-split writes split.no (0-based) and split.count into every shard.
        if h.split_count is not None and h.split_count != count:
            raise VerificationError(f"{name}: header says split.count={h.split_count}, the name says {count}",
                                    hint="The shards come from different split sets; re-fetch them.")
        if h.split_no is not None and h.split_no != i:
            raise VerificationError(f"{name}: header says split.no={h.split_no}, expected {i}",
                                    hint="The shards come from different split sets; re-fetch them.")
        headers.append(h)
    return headers
