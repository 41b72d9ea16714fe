"""`pylmserv fetch`: download models verified into the store (see pylmserv.models)."""
from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import UsageError
from ..app.fetch_models import fetch
from .options import emit_json, json_option, project_command


@project_command
@click.command("fetch")
@click.argument("items", nargs=-1, metavar="NAME_OR_URL...")
@click.option("--sha256", "sha256", metavar="HASH", help="Expected sha256 of a URL item (hex or SRI).")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), help="Also place the file(s) in DIR.")
@click.option("-c", "--connections", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Parallel ranged connections per file.")
@click.option("--stall-limit", type=float, metavar="SECONDS", default=None,
              help="Give up on a download after this long without new data "
                   "[default: $PYLMSERV_STALL_LIMIT, else 120].")
@click.option("--offline", is_flag=True, help="Use the store only (also HF_HUB_OFFLINE=1).")
@click.option("--trust-on-first-use", "tofu", is_flag=True,
              help="Accept an unpinned name or URL and record the hash seen now in the lock.")
@click.option("--no-adopt", is_flag=True,
              help="Never take a verified copy from other tools' caches (HF, ollama, LM Studio, llama.cpp); download.")
@json_option("Print a JSON array of results on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress log lines.")
@click.pass_obj
def command(opts, items, sha256, dest, connections, stall_limit, offline, tofu, no_adopt, as_json, no_progress):
    """Fetch models by lock name, hf://org/repo/file.gguf[@rev], or URL (with --sha256).

    Downloads are resumable (re-run after an interruption), use several connections,
    and are verified (size, sha256, GGUF header) before they enter the store."""
    if not items:
        raise UsageError("nothing to fetch", hint="e.g. `pylmserv fetch stories15m` (names: `pylmserv list`).")
    results = fetch(list(items), dest=dest, connections=connections, offline=offline, sha256=sha256,
                    trust_on_first_use=tofu, stall_limit=stall_limit, config=opts.config if opts else None,
                    lock=opts.lock if opts else None, progress=not no_progress and not (opts and opts.quiet),
                    adopt=not no_adopt)
    if as_json:
        emit_json([r.to_json() for r in results])
        return
    if opts and opts.quiet:  # -q: only errors
        return
    for r in results:
        how = f"downloaded {r.bytes_downloaded / 2**20:.1f} MiB in {r.seconds:.1f}s" if r.bytes_downloaded else "already in the store"
        click.echo(f"{r.name}: {r.path} ({r.size} bytes, sha256 {r.sha256.hex[:16]}..., {how})", err=True)
        if r.dest:
            click.echo(f"  also at {r.dest}", err=True)
