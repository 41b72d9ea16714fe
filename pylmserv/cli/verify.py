"""`pylmserv verify`: re-hash the store, move rotten entries aside (see store.integrity)."""
from __future__ import annotations


import click

from ..store.integrity import OK, RotFound, verify_store
from .options import emit_json, json_option


@click.command("verify")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@json_option('Print {"checked_at", "checked", "bad", "entries": [{kind, name, path, status, '
                   'detail, expected, got, moved_to}]} on stdout.')
@click.option("--no-repair", is_flag=True, help="Only report; leave bad entries where they are.")
def command(names, as_json, no_repair):
    """Re-hash store blobs, source trees and model entries against their recorded hashes.

    A bad entry is moved aside to quarantine/ in the store (never deleted), and the next
    `pylmserv fetch` / `pylmserv build` restores it from its pin. Exits 4 when anything
    was bad. `pylmserv doctor` shows when this last ran."""
    report = verify_store(names, repair=not no_repair)
    if as_json:
        emit_json(report.to_json())
    else:
        for f in report.findings:
            mark = {OK: "ok     "}.get(f.status, f"{f.status.upper():<7}")
            line = f"{mark}{f.kind:<7}{_printable(f.name)}  {f.detail}"
            if f.status != OK and f.expected:
                line += f" (expected {f.expected}" + (f", got {f.got})" if f.got else ")")
            if f.moved_to:
                line += f"; moved to {f.moved_to}"
            click.echo(line)
        if not report.findings:
            click.echo("the store is empty: nothing to verify", err=True)
    if report.not_recorded:
        click.echo(f"verify: the result was not recorded in the store ({report.not_recorded})", err=True)
    if report.bad:
        moved = sum(1 for f in report.bad if f.moved_to)
        if no_repair:
            what = "left in place (--no-repair)"
        elif moved == len(report.bad):
            what = "moved aside; the next fetch/build restores them"
        else:
            what = f"{moved} moved aside, {len(report.bad) - moved} could not be moved (see above)"
        raise RotFound(f"{len(report.bad)} of {len(report.findings)} store entries are bad ({what})",
                       hint="Run `pylmserv fetch NAME` / `pylmserv build` to restore them from their pins.")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
