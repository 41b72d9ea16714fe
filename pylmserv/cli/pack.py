"""`pylmserv pack`: embed a model (and args) into a llamafile, aligned, without zipalign."""
from __future__ import annotations

from pathlib import Path

import click

from ..app.pack import pack
from ..builders.llamafile import default_llamafile
from ..core.log import get_logger
from .options import emit_json, json_option

log = get_logger("pylmserv.pack")


@click.command("pack")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("extra_files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--llamafile", "llamafile", type=click.Path(path_type=Path),
              help="The llamafile binary to pack into (default: the newest one `pylmserv build llamafile` installed).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The packed executable to write.")
@click.option("--arg", "args", multiple=True, metavar="ARG",
              help="A default argument for .args (repeatable), e.g. --arg --ctx-size --arg 4096.")
@click.option("--align", default=65536, show_default=True, type=int, help="Alignment of each file's data (a power of two).")
@click.option("--verify", "verify", type=click.Choice(["sample", "full", "none"]), default="sample", show_default=True,
              help="After writing: re-read sampled windows of large files (sample), every byte with a CRC-32 "
                   "check (full: a second pass), or check only the zip structure and alignment (none).")
@json_option("Print the result as JSON on stdout.")
def command(model, extra_files, llamafile, output, args, align, verify, as_json):
    """Pack MODEL.gguf (and MORE_FILES) into a copy of a llamafile, writing -o OUT.

    Each file is stored uncompressed with its data on an --align boundary; `.args` gets
    `-m /zip/MODEL`, the --arg values, then `...`. The result is marked executable."""
    if llamafile is None:
        llamafile = default_llamafile()
    result = pack(model, llamafile, output, extra_files=extra_files, args=args, align=align, verify=verify)
    if as_json:
        emit_json({
            "output": str(result.output), "size": result.size, "align": result.align, "args": result.args,
            "zip64": result.zip64, "kept_entries": result.kept_entries, "warnings": result.warnings,
            "entries": [{"name": e.name, "offset": e.header_offset, "data_offset": e.data_offset,
                         "size": e.size, "crc32": f"{e.crc32:08x}"} for e in result.entries],
        })
    else:
        names = ", ".join(e.name for e in result.entries)
        log.info("packed %s into %s (%.1f MiB, aligned to %d)", names, result.output, result.size / 2**20,
                 result.align)
