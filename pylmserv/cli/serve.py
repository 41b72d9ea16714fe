"""`pylmserv serve`: fetch + build if needed, run llama-server on loopback until Ctrl-C.

One model: llama-server on it. Several (or --all): llama-server's router mode, every model
of the lock behind one endpoint, chosen by the request's `model` (the pylmserv name).
"""
from __future__ import annotations

from pathlib import Path

import click

from ..app.serve import (ENGINES, SERVER_BIN_ENV, RouterSettings, ServeOptions, all_model_names, default_log_file,
                         read_api_key_file, serve)
from ..app.unit import systemd_unit
from ..builders.llama_cpp import BACKENDS
from ..core.errors import UsageError
from ..pins.config import load_project
from .options import emit_json, json_option, project_command

EXTRA_ARGS = "pylmserv.serve.extra_args"


class ServeCommand(click.Command):
    """MODEL... and the server's own arguments both come last: split them at the first `--`
    before click sees them (click allows one variadic argument, and drops the `--`)."""

    def parse_args(self, ctx, args):
        args = list(args)
        if "--" in args:
            i = args.index("--")
            args, ctx.meta[EXTRA_ARGS] = args[:i], tuple(args[i + 1:])
        return super().parse_args(ctx, args)


def _complete_models(ctx, param, incomplete):
    """Shell completion for MODEL: catalog names (paths are completed by the shell itself)."""
    try:
        project = load_project()
        names = sorted(set(project.config.models) | set(project.lock.models))
    except Exception:  # completion must never print a traceback into the user's shell
        return []
    return [n for n in names if n.startswith(incomplete)]


@project_command
@click.command("serve", cls=ServeCommand)
@click.argument("models", nargs=-1, shell_complete=_complete_models, metavar="MODEL... [-- EXTRA_ARGS...]")
@click.option("--all", "all_models", is_flag=True, help="Serve every model of the lock behind one endpoint.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(("auto",) + BACKENDS),
              envvar="PYLMSERV_BACKEND",
              help="Which build of the engine to run (built first if missing); auto: what this machine has "
                   "(env PYLMSERV_BACKEND).")
@click.option("--engine", default="llama.cpp", show_default=True, type=click.Choice(ENGINES))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --public.")
@click.option("--port", default=8080, show_default=True, type=int, envvar="PYLMSERV_PORT", help="Port to listen on (env PYLMSERV_PORT).")
@click.option("--ngl", type=int, help="Layers to offload to the GPU (llama-server -ngl; with several models, "
                                      "the default of each).")
@click.option("--public", is_flag=True, help="Allow listening on a non-loopback address.")
@click.option("--api-key", envvar="PYLMSERV_API_KEY", help="Require this key from clients (env PYLMSERV_API_KEY).")
@click.option("--api-key-file", type=click.Path(path_type=Path),
              help="Require the key written in this file (one line; e.g. a systemd credential).")
@click.option("--max-loaded", type=int, help="Several models: at most N loaded at once, the least recently used "
                                             "unloaded first (llama-server --models-max; 0: no limit; default 4).")
@click.option("--idle-unload", type=int, metavar="SECONDS",
              help="Several models: free a model's memory after SECONDS without requests (its sleep-idle-seconds).")
@click.option("--pin", multiple=True, metavar="NAME", help="Several models: load NAME at start and never put it to "
                                                          "sleep (refused with --max-loaded below the model count).")
@click.option("--preload", multiple=True, metavar="NAME", help="Several models: load NAME at start "
                                                              "(load-on-startup) instead of on its first request.")
@click.option("--server-bin", type=click.Path(path_type=Path), envvar=SERVER_BIN_ENV,
              help=f"Run this llama-server instead of building one (env {SERVER_BIN_ENV}).")
@click.option("--timeout", "health_timeout", default=300.0, show_default=True, type=float,
              help="Seconds to wait for the model to load (/health).")
@click.option("--offline", is_flag=True, envvar="HF_HUB_OFFLINE", help="Use only models already in the store.")
@click.option("--log", "log_path", type=click.Path(path_type=Path),
              help="Server log file (default: <store>/logs/llama-server-PORT.log; -v shows it live instead).")
@click.option("--generate", type=click.Choice(["systemd"]),
              help="Print a systemd unit that runs this serve (loopback, hardened, key as a credential) "
                   "instead of serving.")
@click.option("--user/--system", "user_unit", default=True, show_default=True,
              help="With --generate systemd: a user unit or a system unit.")
@json_option("When ready, print {url, api, model, models} as one JSON line on stdout.")
@click.pass_context
def command(ctx, models, all_models, backend, engine, host, port, ngl, public, api_key, api_key_file, max_loaded,
            idle_unload, pin, preload, server_bin, health_timeout, offline, log_path, generate, user_unit, as_json):
    """Serve MODEL (a catalog name or a .gguf path) with llama-server; several names (or
    --all) serve every one of them behind one endpoint (llama-server's router mode).

    Binds 127.0.0.1:8080 by default; the web UI is at the root URL and the OpenAI-compatible
    API under /v1 (with several models, a request's "model" is the pylmserv name).
    Arguments after `--` go to llama-server unchanged. Ctrl-C stops the server and
    everything it started.
    """
    g = ctx.obj
    config, lock = (g.config, g.lock) if g else (None, None)
    extra_args = ctx.meta.get(EXTRA_ARGS, ())
    if api_key and api_key_file:
        raise UsageError("give --api-key or --api-key-file, not both")
    if api_key_file:
        api_key = read_api_key_file(api_key_file)
    if all_models:
        if models:
            raise UsageError("--all serves every model of the lock: name none, or leave out --all")
        models = all_model_names(config, lock)
    if not models:
        raise UsageError("no model given", hint="Name a model (`pylmserv list`), several, or pass --all.")
    router_asked = max_loaded is not None or idle_unload is not None or pin or preload
    router = None
    if len(models) > 1 or all_models or router_asked:
        router = RouterSettings(names=tuple(models), max_loaded=max_loaded, idle_unload=idle_unload,
                                pin=tuple(pin), preload=tuple(preload))
    verbose = bool(g and g.verbose)
    log_file = log_path if log_path else (None if verbose else default_log_file(port))
    opts = ServeOptions(model=models[0] if router is None else ",".join(models), backend=backend, engine=engine,
                        host=host, port=port, ngl=ngl, public=public, api_key=api_key, extra_args=tuple(extra_args),
                        server_bin=server_bin, health_timeout=health_timeout, offline=offline, log_file=log_file,
                        router=router)
    if generate == "systemd":
        click.echo(systemd_unit(opts, models, "user" if user_unit else "system", api_key_file=api_key_file,
                                all_models=all_models, config=config, lock=lock), nl=False)
        return 0
    quiet = bool(g and g.quiet)
    shown = models[0] if router is None else ", ".join(models)

    def on_ready(urls):
        if as_json:
            emit_json({"url": urls.base + "/", "api": urls.api, "model": models[0], "models": list(models)},
                      event=True)
        if not quiet:
            click.echo(f"pylmserv: {shown} {'is' if router is None else 'are'} ready", err=True)
            click.echo(f"  web UI:                 {urls.base}/", err=True)
            click.echo(f"  OpenAI-compatible API:  {urls.api}  (e.g. POST {urls.api}/chat/completions)", err=True)
            if router is not None:
                click.echo(f"  models (by \"model\"):    {shown}", err=True)
            if log_file:
                click.echo(f"  server log:             {log_file}", err=True)
            click.echo("Press Ctrl-C to stop.", err=True)

    code = serve(opts, on_ready, config=config, lock=lock)
    if code == 130 and not quiet:
        click.echo("pylmserv: server stopped", err=True)
    return code
