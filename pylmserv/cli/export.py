"""`pylmserv export`: locked models as one OCI image layout archive (see app/share.py)."""
from __future__ import annotations

from pathlib import Path

import click

from ..app.share import export
from .options import emit_json, json_option, project_command


@project_command
@click.command("export")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The archive to write (an OCI image layout in a tar).")
@json_option("Print {path, names, size} on stdout.")
@click.pass_obj
def command(opts, names, output, as_json):
    """Write locked models (from the store) into one file for a machine without a network:
    `pylmserv import FILE` there, or `skopeo copy oci-archive:FILE:NAME docker://...`."""
    result = export(list(names), output, config=opts.config if opts else None, lock=opts.lock if opts else None)
    if as_json:
        emit_json(result.to_json())
        return
    click.echo(f"{result.path}: {', '.join(result.names)} ({result.size} bytes)")
