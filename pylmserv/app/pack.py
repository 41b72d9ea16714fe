"""`pylmserv pack`: embed a GGUF model (and other files) plus `.args` into a llamafile.

The ZIP work (aligned STORED entries, ZIP64, verification) is core/apezip.py; this module
checks the inputs, builds `.args` and reports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Union

from ..core import gguf
from ..core.apezip import (DEFAULT_ALIGN, U32, PackedEntry, check_align, check_readable,  # noqa: F401
                           read_central_directory, verify_packed, write_archive)
from ..core.errors import UsageError, VerificationError
from ..core.log import get_logger
from ..core.names import show

log = get_logger("pylmserv.pack")

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
        check_arg(a)
    names = [model.name] + [p.name for p in extra_files]
    for n in names:
        check_entry_name(n)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or ".args" in names:
        raise UsageError(f"two files would share the name {', '.join(dupes) or '.args'} in the archive",
                         hint="Rename one of them; files are stored under their base name.")
    check_readable(llamafile, "llamafile")
    if output.resolve() in {llamafile.resolve(), model.resolve(), *(p.resolve() for p in extra_files)}:
        raise UsageError(f"output {output} is one of the inputs", hint="Choose another -o path.")
    if output.is_dir():
        raise UsageError(f"output {output} is a directory", hint="Give a file path to -o.")
    check_output_dir(output)
    arg_lines = ["-m", f"/zip/{model.name}", *args, "..."]
    args_blob = ("\n".join(arg_lines) + "\n").encode("utf-8")
    files = [(p.name, p) for p in [model, *extra_files]]
    try:
        size, entries, kept, replaced, zip64 = write_archive(llamafile, output, files, [(".args", args_blob)],
                                                             align, verify)
    except OSError as exc:  # the output's directory cannot be made or written (before any byte)
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}",
                         hint="Choose an -o path in a writable directory.") from None
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
    """The whole GGUF header, as llamafile's loader reads it (not only the magic)."""
    check_readable(model, "model")
    try:
        gguf.check_layout(model)
    except VerificationError as exc:
        why = exc.message.split(": ", 1)[-1]  # (read_header names the file itself)
        raise UsageError(f"{model} is not a GGUF model llamafile can load: {why}",
                         hint="Pass a complete .gguf file as MODEL (re-download it if it is truncated); "
                              "other files can follow it as extra files.") from None


# llamafile 0.8.4 reads /zip/.args with cosmopolitan's LoadZipArgs: one argument per line
# (CR and LF both end a line, empty lines are skipped, NUL ends the text), the line `...`
# becomes the user's own arguments. (Newer llamafiles parse .args like a shell instead.)
_LOST = {"\n": "a line break", "\r": "a carriage return", "\x00": "a NUL byte"}


def check_arg(arg: str) -> None:
    """Refuse an argument llamafile 0.8.4 would split, drop or reinterpret."""
    for char, what in _LOST.items():
        if char in arg:
            raise UsageError(f"--arg {show(repr(arg))} contains {what}: llamafile 0.8.4 would split or cut it",
                             hint=".args holds one argument per line; pass several --arg instead.")
    if arg == "":
        raise UsageError("--arg '' is empty: llamafile 0.8.4 skips empty lines of .args, so it would be lost",
                         hint="Leave it out, or give the option a value.")
    if arg == "...":
        raise UsageError("--arg '...' is where llamafile puts the user's own arguments; pack adds it last",
                         hint="Leave it out.")
    if arg in ("-m", "--model") or arg.startswith("--model="):
        raise UsageError(f"--arg {arg} would replace the packed model", hint="The model is the MODEL argument of pack.")
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"--arg {show(repr(arg))} is not valid text (undecodable bytes)",
                         hint="Pass arguments as UTF-8 text.") from None


def check_entry_name(name: str) -> None:
    """A file name that goes into the archive as a ZIP entry (UTF-8, /zip/NAME in .args)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"file name {show(repr(name))} is not valid UTF-8 (undecodable bytes)",
                         hint="Rename the file to a UTF-8 name before packing it.") from None
    if any(c in name for c in "\n\r\x00"):
        raise UsageError(f"file name {show(repr(name))} holds a line break or NUL: it cannot be named in .args",
                         hint="Rename the file.")


def check_output_dir(output: Path) -> None:
    parent = output.parent if str(output.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"cannot write {output}: {parent} is not a directory", hint="Choose another -o path.")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {output}: {parent} is not writable",
                         hint="Choose an -o path in a writable directory.")
