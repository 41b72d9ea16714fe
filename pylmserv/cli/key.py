"""`pylmserv key`: ed25519 signing keys in Nix's format (`nix key generate-secret`,
`nix key convert-secret-to-public`), without Nix. One key signs a Nix binary cache
(`secret-key-files`, `nix store sign`) and a pylmserv build cache (`pylmserv push --sign-key`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..core.errors import UsageError
from ..core.fsutil import atomic_write_text
from ..core.signing import SecretKey


@click.group("key", help="Make signing keys in Nix's NAME:BASE64 ed25519 format.")
def command():
    pass


@command.command("generate", help="Make a secret key named NAME. With -o FILE it is written there (mode 0600) "
                                  "and the public key is printed; else the secret key is printed, as "
                                  "`nix key generate-secret --key-name NAME` does.")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the secret key to FILE (refused if it exists); print the public key.")
def generate(name, output):
    key = SecretKey.generate(name)
    if output is None:
        click.echo(key.to_text(), nl=False)
        return
    if os.path.lexists(output):
        raise UsageError(f"{output} exists: not overwriting a key", hint="Choose another file, or remove it first.")
    atomic_write_text(output, key.to_text(), mode=0o600)
    click.echo(str(key.public))


@command.command("public", help="Print the public key of a secret key (FILE, or stdin when FILE is -), as "
                                "`nix key convert-secret-to-public` does.")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True), default="-")
def public(file):
    if str(file) == "-":
        key = SecretKey.parse(sys.stdin.read())
    else:
        key = SecretKey.read(file)
    click.echo(str(key.public), nl=False)
