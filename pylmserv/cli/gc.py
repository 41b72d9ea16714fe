"""`pylmserv gc`: delete what no lock, current build or running pylmserv still uses."""
from __future__ import annotations


import click

from ..core.fsutil import human_size
from ..app.gc import collect
from .options import emit_json, json_option


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="List what would be deleted and how much it frees; delete nothing.")
@click.option("--keep-builds", type=click.IntRange(min=0), default=1, show_default=True,
              help="Builds kept per engine and backend besides `current` (newest first, rooted sources only).")
@json_option()
@click.pass_obj
def command(opts, dry_run, keep_builds, as_json):
    """Roots: every lock pylmserv used here (while the file exists), the `current` build of
    each backend, and the locks running pylmserv processes hold. Everything else goes."""
    report = collect(keep_builds=keep_builds, dry_run=dry_run)
    if as_json:
        emit_json(report.to_json())
        return
    verb = "would delete" if dry_run else "deleted"
    for item in report.garbage:
        click.echo(f"{verb} {item.kind:9} {human_size(item.size):>10}  {item.path}")
    for item in report.in_use:
        click.echo(f"in use    {item.kind:9} {human_size(item.size):>10}  {item.path} (held by a running pylmserv)",
                   err=True)
    click.echo(f"{report.home}: {verb} {len(report.garbage)} item(s), {'would free' if dry_run else 'freed'} "
               f"{human_size(report.freed)}; {len(report.in_use)} in use; store {'' if dry_run else 'now '}"
               f"{human_size(report.store_size)}")
