"""`pylmserv list`: catalog entries, which are locked, fetched (path, size), built (backend, path)."""
from __future__ import annotations


import click

from ..core.fsutil import human_size
from ..app.listing import entries, linked
from ..pins.config import load_project
from .options import emit_json, json_option, project_command


def _size(n):
    return human_size(n) if n is not None else "-"


@project_command
@click.command("list")
@json_option("Print {\"entries\": [...]} on stdout.")
@click.pass_obj
def command(g, as_json):
    """Show the catalog: models and sources, locked or not, fetched, built."""
    project = load_project(g.config if g else None, g.lock if g else None)
    items = entries(project)
    links = linked()
    if as_json:
        emit_json({"config": str(project.config_path), "lock": str(project.lock_path),
                   "entries": [e.to_dict() for e in items], "links": links})
        return 0
    echo = click.echo  # the table is the answer: stdout, so it pipes
    echo(f"catalog: {project.config_path}")
    models = [e for e in items if e.kind == "model"]
    sources = [e for e in items if e.kind == "source"]
    width = max((len(e.name) for e in items), default=4)
    echo("")
    echo(f"{'MODEL':<{width}}  {'LOCKED':<6}  {'SIZE':>9}  FETCHED")
    for e in models:
        locked = ("drift" if e.drift else "yes") if e.locked else "no"
        fetched = f"{e.fetched_path} ({_size(e.fetched_size)})" if e.fetched else "-"
        if e.stale:
            fetched += " [stale: the lock pins other bytes; run `pylmserv fetch " + e.name + "`]"
        echo(f"{e.name:<{width}}  {locked:<6}  {_size(e.size):>9}  {fetched}")
    echo("")
    pins = [(e.pin or "-")[:20] for e in sources]  # a rev, a tag or a version
    pw = max([3] + [len(p) for p in pins])
    echo(f"{'SOURCE':<{width}}  {'LOCKED':<6}  {'PIN':<{pw}}  FETCHED / BUILT")
    for e, pin in zip(sources, pins):
        locked = ("drift" if e.drift else "yes") if e.locked else "no"
        rows = [str(e.fetched_path) if e.fetched else "-"]
        rows += [f"built {b.engine} {b.backend}: {b.path}" for b in e.built]
        echo(f"{e.name:<{width}}  {locked:<6}  {pin:<{pw}}  {rows[0]}")
        for extra in rows[1:]:
            echo(f"{'':<{width}}  {'':<6}  {'':<{pw}}  {extra}")
    if links:
        echo("")
        for l in links:
            echo(f"linked: {l['name']} ({l['layout']}) " + ", ".join(l["paths"]))
    drifted = [e for e in items if e.drift]
    if drifted:
        echo("")
        for e in drifted:
            echo(f"drift: {e.kind} {e.name}: " + "; ".join(e.drift) + " (run `pylmserv prefetch " + e.name + "`)")
    return 0
