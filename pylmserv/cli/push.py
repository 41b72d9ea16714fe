"""`pylmserv push`: locked models to an OCI registry (app/share.py), or with the name
`llama.cpp` the portable builds of the locked source to a build cache, signed
(builders.push_builds)."""
from __future__ import annotations

from pathlib import Path

import click

from ..app.share import push
from ..builders import push_builds
from ..builders.llama_cpp import BACKENDS
from ..core.errors import UsageError
from .options import emit_json, json_option, project_command

BUILDS = "llama.cpp"


@project_command
@click.command("push")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--to", "to", required=True, metavar="DEST",
              help="Models: oci://HOST[:PORT]/REPO (each model tagged with its name). Builds: a directory, "
                   "file:///DIR or oci://HOST/REPO.")
@click.option("--sign-key", "sign_key", type=click.Path(path_type=Path, dir_okay=False),
              help="Builds: secret key file (`pylmserv key generate NAME -o FILE` or `nix key generate-secret`).")
@click.option("--backend", "backends", multiple=True, metavar="BACKEND",
              help="Builds: only this backend's builds (repeatable; default: every backend built).")
@click.option("--chunk-size", type=click.IntRange(0), default=0, metavar="BYTES",
              help="Models: upload in PATCH chunks of this size (0: one streamed PUT per file).")
@json_option("Models: a JSON array of {name, reference, digest, uploaded, seconds}; builds: {pushed: [...]}.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress log lines.")
@click.pass_obj
def command(opts, names, to, sign_key, backends, chunk_size, as_json, no_progress):
    """Push locked models as CNCF ModelPack OCI artifacts (raw GGUF layers: the layer digest
    is the file's sha256 from the lock), so `oci://HOST/REPO` serves as a mirror; or, with
    NAME `llama.cpp` and --sign-key, the current portable builds of the locked source, which
    other machines substitute with `pylmserv build --portable`.

    Logins come from the container tools' auth files (REGISTRY_AUTH_FILE,
    ~/.config/containers/auth.json, ~/.docker/config.json); plain HTTP only to loopback
    registries or those in PYLMSERV_INSECURE_REGISTRIES."""
    config, lock = (opts.config, opts.lock) if opts else (None, None)
    if BUILDS in names:
        if len(names) > 1:
            raise UsageError(f"push {BUILDS} (builds) and models in one command",
                             hint=f"Run `pylmserv push {BUILDS} ...` and `pylmserv push MODEL... ...` separately.")
        if sign_key is None:
            raise UsageError("pushing builds needs --sign-key FILE: a substitute is only installed when signed",
                             hint="Make one with `pylmserv key generate NAME -o FILE` (or `nix key generate-secret`).")
        _push_builds(to, sign_key, backends, config, lock, as_json)
        return
    if sign_key is not None or backends:
        raise UsageError("--sign-key and --backend apply to `pylmserv push llama.cpp` (builds) only",
                         hint="Models are checked by their sha256 in the lock: push them without a key.")
    results = push(list(names), to, config=config, lock=lock,
                   progress=not no_progress and not (opts and opts.quiet), chunk_size=chunk_size)
    if as_json:
        emit_json([r.to_json() for r in results])
        return
    for r in results:
        click.echo(f"{r.reference}@sha256:{r.digest.hex}")


def _push_builds(to, sign_key, backends, config, lock, as_json) -> None:
    for b in backends:
        if b not in BACKENDS:
            raise UsageError(f"--backend {b}: not a backend", hint=f"One of: {', '.join(BACKENDS)}.")
    pushed = push_builds(to, sign_key, BUILDS, backends, config=config, lock=lock)
    if as_json:
        emit_json({"pushed": [{"key": m["key"], "backend": m["backend"], "signatures": m["signatures"],
                               "files": {f["name"]: f["sha256"] for f in m["files"]}} for m in pushed]})
        return
    for m in pushed:
        names = ", ".join(f["name"] for f in m["files"] if f.get("target"))
        click.echo(f"{m['engine']} ({m['backend']}) {m['key']}: {names} ({len(m['files'])} files) "
                   f"signed by {m['signed_by']} -> {to}")
