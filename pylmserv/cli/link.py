"""`pylmserv link`: show locked models to other tools (HF cache, ollama, LM Studio) by hard link."""
from __future__ import annotations

from pathlib import Path

import click

from ..app.link import link, unlink
from ..core.errors import UsageError
from ..pins.config import load_project
from ..store.views import LAYOUTS
from .options import emit_json, json_option, project_command


@project_command
@click.command("link")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--layout", "layout", type=click.Choice(LAYOUTS), default=None,
              help="Whose layout: hf (huggingface_hub, llama-server -hf), ollama, lmstudio.")
@click.option("--to", "to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Root to lay out under [default: the tool's own location].")
@click.option("--remove", is_flag=True, help="Undo: remove what `link` made (only that).")
@json_option("Print {\"links\": [...]} on stdout.")
@click.pass_obj
def command(g, names, layout, to, remove, as_json):
    """Lay fetched models out where another tool looks for them: hard links to the store's
    files (a symlink only where a hard link cannot be made), never a copy."""
    if remove:
        gone = unlink(list(names), layout, to)
        if as_json:
            emit_json({"removed": [{"link": l.to_json(), "paths": paths} for l, paths in gone]})
            return 0
        for l, paths in gone:
            click.echo(f"{l.name}: {l.layout} view under {l.root} removed ({len(paths)} paths)")
        return 0
    if layout is None:
        raise UsageError("--layout is required", hint="--layout hf, ollama or lmstudio")
    project = load_project(g.config if g else None, g.lock if g else None)
    made = link(project, list(names), layout, to)
    if as_json:
        emit_json({"links": [l.to_json() for l in made]})
        return 0
    for l in made:
        click.echo(f"{l.name}: {l.layout} view under {l.root}")
        for m in l.made:
            if m.how != "dir":
                click.echo(f"  {m.path} ({'written' if m.how == 'file' else m.how})")
        for k in l.kept:
            click.echo(f"  {k} (already there, left alone)")
    return 0
