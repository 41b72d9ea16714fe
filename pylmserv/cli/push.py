"""`pylmserv push`: locked models from the store to an OCI registry (see app/share.py)."""
from __future__ import annotations

import click

from ..app.share import push
from .options import emit_json, json_option, project_command


@project_command
@click.command("push")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--to", "to", required=True, metavar="oci://HOST[:PORT]/REPO",
              help="The registry repository; each model is tagged with its name.")
@click.option("--chunk-size", type=click.IntRange(0), default=0, metavar="BYTES",
              help="Upload in PATCH chunks of this size (0: one streamed PUT per file).")
@json_option("Print a JSON array of {name, reference, digest, uploaded, seconds} on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress log lines.")
@click.pass_obj
def command(opts, names, to, chunk_size, as_json, no_progress):
    """Push locked models as CNCF ModelPack OCI artifacts (raw GGUF layers: the layer digest
    is the file's sha256 from the lock), so `oci://HOST/REPO` serves as a mirror.

    Logins come from the container tools' auth files (REGISTRY_AUTH_FILE,
    ~/.config/containers/auth.json, ~/.docker/config.json); plain HTTP only to loopback
    registries or those in PYLMSERV_INSECURE_REGISTRIES."""
    results = push(list(names), to, config=opts.config if opts else None, lock=opts.lock if opts else None,
                   progress=not no_progress and not (opts and opts.quiet), chunk_size=chunk_size)
    if as_json:
        emit_json([r.to_json() for r in results])
        return
    for r in results:
        click.echo(f"{r.reference}@sha256:{r.digest.hex}")
