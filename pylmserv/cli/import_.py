"""`pylmserv import`: install an exported bundle into the store, offline (see app/share.py)."""
from __future__ import annotations

from pathlib import Path

import click

from ..app.share import import_bundle
from .options import emit_json, json_option


@click.command("import")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@json_option("Print a JSON array of {name, path, size, sha256} on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress log lines.")
@click.pass_obj
def command(opts, bundle, as_json, no_progress):
    """Install the models of an OCI image layout archive (`pylmserv export`): no network;
    every blob is checked against its digest, and a damaged file leaves nothing behind."""
    results = import_bundle(bundle, progress=not no_progress and not (opts and opts.quiet))
    if as_json:
        emit_json([r.to_json() for r in results])
        return
    for r in results:
        click.echo(f"{r.name}: {r.path} ({r.size} bytes, sha256 {r.sha256.hex[:16]}...)")
