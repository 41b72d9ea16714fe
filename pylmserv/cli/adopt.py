"""`pylmserv adopt`: take verified copies of locked models from other tools' caches."""
from __future__ import annotations

import click

from ..app.adopt import scan
from ..pins.config import load_project
from .options import emit_json, json_option, project_command


@project_command
@click.command("adopt")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@click.option("--dry-run", is_flag=True, help="Verify and report only; link nothing into the store.")
@json_option("Print {\"models\": [...], \"saved\": BYTES} on stdout.")
@click.pass_obj
def command(g, names, dry_run, as_json):
    """Look in the Hugging Face cache, ollama, LM Studio, llama.cpp's cache and adopt-from
    folders for every locked model (or NAMEs) not in the store; adopt verified copies."""
    project = load_project(g.config if g else None, g.lock if g else None)
    reports = scan(project, list(names) or None, dry_run=dry_run)
    saved = sum(r.saved for r in reports)
    if as_json:
        emit_json({"dry_run": dry_run, "saved": saved, "models": [r.to_json() for r in reports]})
        return 0
    for r in reports:
        for f in r.files:
            found = f["found"]
            if f["state"] == "in store":
                where = "in the store"
            elif found:
                how = f"would link ({found['tool']})" if dry_run else f"{found['method']}, {found['bytes_copied']} bytes copied"
                where = f"{found['path']} [{how}]"
            else:
                where = "not found"
            click.echo(f"{r.name}: {f['filename']}: {where}")
            for s in f["skipped"]:
                click.echo(f"  skipped {s['path']} ({s['tool']}): {s['reason']}")
    verb = "would save" if dry_run else "saved"
    click.echo(f"{verb} {saved} bytes of downloads")
    return 0
