"""`pylmserv hash`: `nix hash path|file` and `nix hash to-sri` without Nix."""
from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import UsageError
from ..core.hashing import FORMATS, Hash
from ..core.nar import hash_path


@click.command("hash")
@click.argument("target", required=False)
@click.option("--mode", type=click.Choice(["nar", "flat"]), help="Default: nar for directories and symlinks, flat for files.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="sri", show_default=True)
@click.option("--type", "algo", type=click.Choice(["sha256", "sha512", "sha1", "md5"]), default="sha256", show_default=True)
@click.option("--to", "to", type=click.Choice(FORMATS), help="Convert the hash VALUE given as TARGET to this encoding.")
def command(target, mode, fmt, algo, to):
    """Hash PATH like `nix hash path` / `nix hash file`, or convert a hash: --to sri VALUE."""
    if target is None:
        raise UsageError("missing PATH (or VALUE with --to)", hint="e.g. `pylmserv hash ./src` or `pylmserv hash --to sri <hex>`.")
    if to:
        # A bare digest of ambiguous length is read with --type; prefixed forms name their own.
        value = Hash.parse(target, algo=algo if algo != "sha256" else None)
        click.echo(value.format(to))
        return

    path = Path(target)
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"no such file or directory: {target}", hint="Give an existing path, or use --to to convert a hash value.")
    click.echo(hash_path(path, mode, algo).format(fmt))
