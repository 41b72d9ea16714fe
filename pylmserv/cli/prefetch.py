"""`pylmserv prefetch`: resolve refs, compute Nix-exact hashes, write pylmserv.lock."""
from __future__ import annotations


import click

from ..core.errors import VerificationError
from ..pins.prefetch import prefetch
from .options import emit_json, json_option, project_command, via_option


@project_command
@click.command("prefetch")
@click.argument("names", nargs=-1)
@via_option()
@click.option("--check", is_flag=True, help="Recompute and compare with the lock; write nothing; exit 4 on drift.")
@click.option("--refresh", is_flag=True, help="Refetch even entries whose ref still resolves to the locked rev.")
@json_option()
@click.pass_obj
def command(opts, names, via, check, refresh, as_json):
    """Pin NAMES (default: every source and model in pylmserv.toml) into pylmserv.lock."""
    result = prefetch(names=list(names) or None, config=opts.config, lock=opts.lock, via=via,
                      check=check, refresh=refresh)
    if as_json:
        emit_json(result.to_json())
    if not opts.quiet and not check:
        for change in result.changes:
            if change.status != "unchanged" or opts.verbose:
                click.echo(change.describe(), err=True)
    for drift in result.drift:  # the point of --check: listed even with -q
        click.echo(f"drift: {drift.describe()}", err=True)
    if check:
        if result.drift:
            raise VerificationError(f"{len(result.drift)} entr{'y' if len(result.drift) == 1 else 'ies'} drifted from "
                                    f"{result.lock_path}: " + "; ".join(d.name for d in result.drift),
                                    hint="If these changes are intended, accept them with `pylmserv prefetch --refresh "
                                         + " ".join(d.name for d in result.drift) + "`.")
        if not opts.quiet:
            click.echo(f"{result.lock_path}: {len(result.changes)} entries match", err=True)
    elif not opts.quiet:
        what = "written" if result.written else "already up to date"
        click.echo(f"{result.lock_path}: {what} ({len(result.changed)} changed)", err=True)
