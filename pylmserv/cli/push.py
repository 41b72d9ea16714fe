"""`pylmserv push llama.cpp --to CACHE --sign-key FILE`: share portable builds, signed."""
from __future__ import annotations

from pathlib import Path

import click

from ..builders import push_builds
from ..builders.llama_cpp import BACKENDS
from .options import emit_json, json_option, project_command


@project_command
@click.command("push", help="Push the portable builds of the locked llama.cpp source to a build cache "
                            "(file:///DIR or DIR; oci://HOST/REPO), signed with a Nix-format ed25519 key. "
                            "Other machines substitute them with `pylmserv build --portable`.")
@click.argument("what", type=click.Choice(["llama.cpp"]), default="llama.cpp", required=False)
@click.option("--to", "to", required=True, metavar="CACHE", help="Where: a directory, file:///DIR or oci://HOST/REPO.")
@click.option("--sign-key", "sign_key", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Secret key file (`pylmserv key generate NAME -o FILE` or `nix key generate-secret`).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS),
              help="Only this backend's builds (repeatable; default: every backend built).")
@json_option()
@click.pass_obj
def command(obj, what, to, sign_key, backends, as_json):
    pushed = push_builds(to, sign_key, what, backends, config=obj.config if obj else None,
                         lock=obj.lock if obj else None)
    if as_json:
        emit_json({"pushed": [{"key": m["key"], "backend": m["backend"], "signatures": m["signatures"],
                               "files": {f["name"]: f["sha256"] for f in m["files"]}} for m in pushed]})
        return
    for m in pushed:
        names = ", ".join(f["name"] for f in m["files"] if f.get("target"))
        click.echo(f"{m['engine']} ({m['backend']}) {m['key']}: {names} ({len(m['files'])} files) "
                   f"signed by {m['signed_by']} -> {to}")
