"""`pylmserv update`: move pins to the newest upstream release, tag or branch head."""
from __future__ import annotations


import click

from ..pins.update import EXIT_UPDATED, update
from .options import emit_json, json_option, project_command, via_option


@project_command
@click.command("update", epilog=f"Exit status: 0 nothing to update; {EXIT_UPDATED} something was updated "
                                "(with --dry-run: would be); other codes are errors (see pylmserv --help).")
@click.argument("names", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Show what would move; write nothing.")
@click.option("--commit", "git_commit", is_flag=True,
              help="One git commit per updated entry (\"NAME: OLD -> NEW\"), config and lock only.")
@via_option()
@json_option()
@click.pass_obj
def command(opts, names, dry_run, git_commit, via, as_json):
    """Follow upstream for NAMES (default: all) as each entry's `track` key says; print
    old -> new per entry, then rewrite config and lock together."""
    result = update(names=list(names) or None, config=opts.config, lock=opts.lock, dry_run=dry_run,
                    commit=git_commit, via=via)
    if as_json:
        emit_json(result.to_json())
    elif not opts.quiet or result.changed:
        for entry in result.entries:
            if entry.changed or not opts.quiet:
                click.echo(entry.describe())
        if dry_run and result.changed:
            click.echo(f"{len(result.changed)} would be updated (dry run: nothing written)", err=True)
    return result.exit_code
