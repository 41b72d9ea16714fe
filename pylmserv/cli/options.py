"""The options several commands share, each declared once, and the one JSON emitter.

- `project_command`: --config/--lock after the command's name too (a command that reads the
  project opts in with this decorator, so none can forget it);
- `json_option`: `--json` (the answer as JSON on stdout, printed by `emit_json`);
- `via_option`: how to hash (prefetch, add, update).

JSON style, one for every command: a document is indented by 2 with sorted keys; a stream
event (serve's "ready") is one line, sorted keys, so `readline()` gets it whole.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import click


class GlobalOptions(NamedTuple):
    """Options every command sees (resolved once, passed down). A NamedTuple, not a frozen
    dataclass: cheaper to create on every command's start (the up-to-date `build` budget)."""

    verbose: int = 0
    quiet: bool = False
    config: Optional[Path] = None
    lock: Optional[Path] = None


def _override(field_name):
    def callback(ctx, _param, value):
        if value is not None:
            ctx.obj = (ctx.obj or GlobalOptions())._replace(**{field_name: value})
        return value

    return callback


def project_command(cmd: click.Command) -> click.Command:
    """Mark a command as reading the project: it takes --config/--lock after its name too
    (`pylmserv add --lock x.lock SPEC`), overriding the group's. Apply above @click.command."""
    cmd.params.extend([
        click.Option(["--config"], type=click.Path(path_type=Path), expose_value=False, is_eager=True,
                     callback=_override("config"), help="pylmserv.toml to use (same as before the command)."),
        click.Option(["--lock"], type=click.Path(path_type=Path), expose_value=False, is_eager=True,
                     callback=_override("lock"), help="pylmserv.lock to use (same as before the command)."),
    ])
    return cmd


def json_option(help: str = "Machine-readable result on stdout."):
    """`--json`, passed to the command as `as_json`."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def via_option(verb: str = "How to hash"):
    return click.option("--via", type=click.Choice(["auto", "python", "nix", "fod"]), default="auto",
                        show_default=True, help=f"{verb}: auto, python (in-process), nix (the nix tools), "
                                               "fod (a real fixed-output build).")


def emit_json(doc, *, event: bool = False) -> None:
    """Print a --json answer on stdout: a document (indent 2, sorted keys), or with event=True
    one line (a stream event a reader takes with readline)."""
    if event:
        text = json.dumps(doc, sort_keys=True, default=str)
    else:
        text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    click.echo(text)
    if event:
        click.get_text_stream("stdout").flush()
