"""`pylmserv doctor`: tools, GPUs and their toolchains, binfmt_misc, store, lock."""
from __future__ import annotations

import os

import click

from ..app.doctor import FAIL, OK, WARN, diagnose
from ..builders.llama_cpp import BACKENDS
from .options import emit_json, json_option, project_command

MARKS = {OK: ("ok  ", "green"), WARN: ("warn", "yellow"), FAIL: ("FAIL", "red")}


def use_color() -> bool:
    # https://no-color.org: any non-empty NO_COLOR turns colour off; click already drops
    # ANSI codes when stdout is not a terminal.
    return not os.environ.get("NO_COLOR")


@project_command
@click.command("doctor")
@json_option('Print {"checks": [{name, status, detail, hint}]} on stdout.')
@click.option("--backend", type=click.Choice(BACKENDS),
              help="The backend you mean to build: also check its toolchain and that it fits the GPU.")
@click.pass_obj
def command(g, as_json, backend):
    """Diagnose this machine before a build or download fails on it.

    Each check is ok, warn or fail, with a hint for what to do. Exits 1 if any check fails.
    """
    report = diagnose(config=g.config if g else None, lock=g.lock if g else None, backend=backend)
    if as_json:
        emit_json(report.to_dict())
    else:
        color = use_color()
        width = max(len(c.name) for c in report.checks)
        for c in report.checks:
            mark, fg = MARKS[c.status]
            mark = click.style(mark, fg=fg, bold=c.status == FAIL) if color else mark
            click.echo(f"[{mark}] {c.name:<{width}}  {c.detail}")  # the report is the answer: stdout
            if c.hint and c.status != OK:
                pad = " " * (width + 9)
                lines = c.hint.splitlines()
                click.echo(f"{pad}hint: {lines[0]}")
                for line in lines[1:]:  # multi-step fixes: one command per line, copy-pasteable
                    click.echo(f"{pad}      {line}")
        counts = {s: sum(c.status == s for c in report.checks) for s in (OK, WARN, FAIL)}
        click.echo(f"{counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failed")
    return 1 if report.failed else 0
