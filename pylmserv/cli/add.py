"""`pylmserv add SPEC`: add an entry to pylmserv.toml and pin it in pylmserv.lock."""
from __future__ import annotations


import click

from ..pins.add import add
from .options import emit_json, json_option, project_command, via_option


@project_command
@click.command("add")
@click.argument("spec")
@click.option("--name", help="Entry name (default: derived from SPEC: letters, digits, '_', '-').")
@click.option("--unpack", is_flag=True, help="URL sources: an archive, pinned by the NAR hash of its tree.")
@click.option("--force", is_flag=True, help="Replace an entry of the same name.")
@via_option()
@json_option()
@click.pass_obj
def command(opts, spec, name, unpack, force, via, as_json):
    """Add SPEC and pin it: hf://ORG/REPO/FILE.gguf[@REV], github:OWNER/REPO[@REF], or a URL.

    The config keeps its comments and layout; nothing is written when pinning fails.
    """
    result = add(spec, name=name, unpack=unpack, force=force, config=opts.config, lock=opts.lock, via=via)
    if as_json:
        emit_json(result.to_json())
        return
    pin = result.change.new if result.change else None
    what = "replaced" if result.replaced else "added"
    line = f"{result.addition.kind}.{result.addition.name}: {what}"
    if pin is not None:
        line += f", pinned {pin.rev[:12] + ' ' if pin.rev else ''}{pin.hash.sri}"
    click.echo(line)
