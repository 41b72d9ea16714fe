"""`pylmserv serve`: fetch + build if needed, run llama-server on loopback until Ctrl-C."""
from __future__ import annotations

from pathlib import Path

import click

from ..app.serve import ENGINES, SERVER_BIN_ENV, ServeOptions, default_log_file, serve
from ..builders.llama_cpp import BACKENDS
from ..pins.config import load_project
from .options import emit_json, json_option, project_command


def _complete_models(ctx, param, incomplete):
    """Shell completion for MODEL: catalog names (paths are completed by the shell itself)."""
    try:
        project = load_project()
        names = sorted(set(project.config.models) | set(project.lock.models))
    except Exception:  # completion must never print a traceback into the user's shell
        return []
    return [n for n in names if n.startswith(incomplete)]


@project_command
@click.command("serve")
@click.argument("model", shell_complete=_complete_models)
@click.argument("extra_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- EXTRA_ARGS...]")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(("auto",) + BACKENDS),
              envvar="PYLMSERV_BACKEND",
              help="Which build of the engine to run (built first if missing); auto: what this machine has "
                   "(env PYLMSERV_BACKEND).")
@click.option("--engine", default="llama.cpp", show_default=True, type=click.Choice(ENGINES))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --public.")
@click.option("--port", default=8080, show_default=True, type=int, envvar="PYLMSERV_PORT", help="Port to listen on (env PYLMSERV_PORT).")
@click.option("--ngl", type=int, help="Layers to offload to the GPU (llama-server -ngl).")
@click.option("--public", is_flag=True, help="Allow listening on a non-loopback address.")
@click.option("--api-key", envvar="PYLMSERV_API_KEY", help="Require this key from clients (env PYLMSERV_API_KEY).")
@click.option("--server-bin", type=click.Path(path_type=Path), envvar=SERVER_BIN_ENV,
              help=f"Run this llama-server instead of building one (env {SERVER_BIN_ENV}).")
@click.option("--timeout", "health_timeout", default=300.0, show_default=True, type=float,
              help="Seconds to wait for the model to load (/health).")
@click.option("--offline", is_flag=True, envvar="HF_HUB_OFFLINE", help="Use only models already in the store.")
@click.option("--log", "log_path", type=click.Path(path_type=Path),
              help="Server log file (default: <store>/logs/llama-server-PORT.log; -v shows it live instead).")
@json_option("When ready, print {url, api, model} as one JSON line on stdout.")
@click.pass_obj
def command(g, model, extra_args, backend, engine, host, port, ngl, public, api_key, server_bin, health_timeout,
            offline, log_path, as_json):
    """Serve MODEL (a catalog name or a .gguf path) with llama-server.

    Binds 127.0.0.1:8080 by default; the web UI is at the root URL and the OpenAI-compatible
    API under /v1. Arguments after `--` go to llama-server unchanged. Ctrl-C stops the
    server and everything it started.
    """
    verbose = bool(g and g.verbose)
    log_file = log_path if log_path else (None if verbose else default_log_file(port))
    opts = ServeOptions(model=model, backend=backend, engine=engine, host=host, port=port, ngl=ngl,
                        public=public, api_key=api_key, extra_args=tuple(extra_args), server_bin=server_bin,
                        health_timeout=health_timeout, offline=offline, log_file=log_file)
    quiet = bool(g and g.quiet)
    state = {}

    def on_ready(urls):
        state["ready"] = True
        if as_json:
            emit_json({"url": urls.base + "/", "api": urls.api, "model": model}, event=True)
        if not quiet:
            click.echo(f"pylmserv: {model} is ready", err=True)
            click.echo(f"  web UI:                 {urls.base}/", err=True)
            click.echo(f"  OpenAI-compatible API:  {urls.api}  (e.g. POST {urls.api}/chat/completions)", err=True)
            if log_file:
                click.echo(f"  server log:             {log_file}", err=True)
            click.echo("Press Ctrl-C to stop.", err=True)

    code = serve(opts, on_ready, config=g.config if g else None, lock=g.lock if g else None)
    if code == 130 and not quiet:
        click.echo("pylmserv: server stopped", err=True)
    return code
