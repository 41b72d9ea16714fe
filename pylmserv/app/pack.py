"""`pylmserv pack`: embed a GGUF model (and other files) plus `.args` into a llamafile.

The ZIP work (aligned STORED entries, ZIP64, verification) is core/apezip.py; this module
checks the inputs, builds `.args` and reports.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Union

from ..core import gguf
from ..core.apezip import (DEFAULT_ALIGN, U32, PackedEntry, check_align, check_readable,  # noqa: F401
                           read_central_directory, verify_packed, write_archive)
from ..core.errors import UsageError

log = logging.getLogger("pylmserv.pack")

WINDOWS_EXE_LIMIT = 1 << 32  # Windows refuses to run executables of 4 GiB or more


@dataclass
class PackResult:
    output: Path
    size: int
    align: int
    args: List[str]
    entries: List[PackedEntry]  # the entries this pack added (.args included)
    kept_entries: int  # entries of the input llamafile kept as they were
    zip64: bool
    warnings: List[str] = field(default_factory=list)


# -- public API -------------------------------------------------------------------

def pack(model: Union[str, Path], llamafile: Union[str, Path], output: Union[str, Path],
         extra_files: Sequence[Union[str, Path]] = (), args: Sequence[str] = (),
         align: int = DEFAULT_ALIGN, verify: Union[str, bool] = "sample") -> PackResult:
    """Write `output`: `llamafile` + `model` (+ `extra_files`) + `.args`, each aligned.

    `args` go into `.args` after `-m /zip/<model>`, followed by `...` (the user's own
    command-line arguments at run time).

    The output is always reopened and its central directory, local headers and alignment
    checked. Contents: `verify="sample"` (default) re-reads small entries whole and, of
    large ones, windows at the start, the end and spread between, comparing them byte for
    byte with the source (the CRC-32 was computed from the very bytes written, in the one
    streamed pass); `"full"` (or True) re-reads every byte and checks the CRC-32 (a second
    pass over the model); `"none"` (or False) checks only the structure."""
    model, llamafile, output = Path(model), Path(llamafile), Path(output)
    extra_files = [Path(p) for p in extra_files]
    verify = _verify_mode(verify)
    check_align(align)
    _check_model(model)
    for path in extra_files:
        check_readable(path, "file")
    args = [str(a) for a in args]
    for a in args:
        if "\n" in a or "\r" in a:
            raise UsageError(f"--arg {a!r} contains a line break", hint=".args holds one argument per line; split it into several --arg.")
    names = [model.name] + [p.name for p in extra_files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or ".args" in names:
        raise UsageError(f"two files would share the name {', '.join(dupes) or '.args'} in the archive",
                         hint="Rename one of them; files are stored under their base name.")
    check_readable(llamafile, "llamafile")
    if output.resolve() in {llamafile.resolve(), model.resolve(), *(p.resolve() for p in extra_files)}:
        raise UsageError(f"output {output} is one of the inputs", hint="Choose another -o path.")
    if output.is_dir():
        raise UsageError(f"output {output} is a directory", hint="Give a file path to -o.")
    arg_lines = ["-m", f"/zip/{model.name}", *args, "..."]
    args_blob = ("\n".join(arg_lines) + "\n").encode("utf-8")
    files = [(p.name, p) for p in [model, *extra_files]]
    size, entries, kept, replaced, zip64 = write_archive(llamafile, output, files, [(".args", args_blob)], align, verify)
    warnings = []
    if replaced:
        warnings.append(f"replaced {replaced} existing entr{'y' if replaced == 1 else 'ies'} of the same name "
                        "(their old bytes stay in the file, unreferenced)")
    if size >= WINDOWS_EXE_LIMIT:
        warnings.append(f"{output.name} is {size / 2**30:.1f} GiB: Windows cannot run executables over 4 GiB; "
                        "Windows users should run the bare llamafile with -m MODEL.gguf instead")
    for w in warnings:
        log.warning("warning: %s", w)
    return PackResult(output=output, size=size, align=align, args=arg_lines, entries=entries,
                      kept_entries=kept, zip64=zip64, warnings=warnings)


def _verify_mode(verify) -> str:
    if verify is True:
        return "full"
    if verify is False or verify is None:
        return "none"
    if verify not in ("full", "sample", "none"):
        raise UsageError(f"unknown verify mode {verify!r}", hint="Use full, sample or none.")
    return verify


def _check_model(model: Path) -> None:
    check_readable(model, "model")
    with open(model, "rb") as f:
        magic = f.read(4)
    if magic != gguf.MAGIC:
        raise UsageError(f"{model} is not a GGUF model (starts with {magic!r}, expected b'GGUF')",
                         hint="Pass the .gguf file as MODEL; other files can follow it as extra files.")
