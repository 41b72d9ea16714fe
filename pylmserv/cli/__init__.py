"""The `pylmserv` command line: a thin layer that parses, calls the library, renders.

Each subcommand lives in pylmserv/cli/<name>.py and is imported only when run,
so `pylmserv --help` stays fast.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import click

from ..core.version import __version__
from ..core.errors import EXIT_CODES, PylmservError
from ..core.log import DEBUG, INFO, WARNING, configure
from ..core.names import show
from .options import GlobalOptions

# name -> (module under pylmserv.cli, one-line help shown by --help)
COMMANDS = {
    "prefetch": ("prefetch", "Resolve refs, compute Nix-exact hashes, write pylmserv.lock."),
    "fetch": ("fetch", "Download models: resumable, multi-connection, SHA-256 verified."),
    "build": ("build", "Build llama.cpp or llamafile from the locked source."),
    "pack": ("pack", "Embed a model (and args) into a llamafile."),
    "hash": ("hash", "Hash a file or tree exactly as Nix does; convert hash encodings."),
    "list": ("list_", "Show catalog entries: locked, fetched, built."),
    "doctor": ("doctor", "Diagnose this machine: tools, GPUs, binfmt_misc, store, lock."),
    "serve": ("serve", "Run a model with llama-server on localhost."),
    "verify": ("verify", "Re-hash the store; move rotten entries aside for the next fetch/build."),
    "add": ("add", "Add a model or source to pylmserv.toml and pin it in one step."),
    "update": ("update", "Move pins to the newest upstream release, tag or branch head."),
    "gc": ("gc", "Delete what no lock, current build or running pylmserv still uses."),
    "push": ("push", "Push models or signed builds to a registry or build cache."),
    "key": ("key", "Make ed25519 signing keys in Nix's NAME:BASE64 format."),
    "adopt": ("adopt", "Take verified copies of locked models from other tools' caches."),
    "link": ("link", "Lay fetched models out for HF, ollama, LM Studio by hard link."),
    "export": ("export", "Write locked models into one OCI archive for an offline machine."),
    "import": ("import_", "Install an exported archive offline, every digest checked."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, _ = COMMANDS[name]
        try:
            mod = importlib.import_module(f"pylmserv.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pylmserv.cli.{module}":
                raise
            return _not_yet(name)
        return mod.command

    def format_commands(self, ctx, formatter):
        # Help text comes from the table, not from importing every command.
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _not_yet(name):
    @click.command(name, help=COMMANDS[name][1])
    def stub():
        raise PylmservError(f"'{name}' is not available in this version of pylmserv.",
                            hint="Upgrade pylmserv.")

    return stub


EPILOG = "Exit codes: " + "; ".join(f"{c} {m}" for c, m in EXIT_CODES.items()) + "."


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="pylmserv")
@click.option("-v", "--verbose", count=True, help="More output; tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("--config", "config", type=click.Path(path_type=Path), envvar="PYLMSERV_CONFIG",
              help="pylmserv.toml to use (default: ./pylmserv.toml, else the packaged catalog).")
@click.option("--lock", "lock", type=click.Path(path_type=Path), envvar="PYLMSERV_LOCK",
              help="pylmserv.lock to use (default: beside the config).")
@click.pass_context
def cli(ctx, verbose, quiet, config, lock):
    """pylmserv: llama.cpp and llamafile built right, models fetched and verified."""
    _setup_logging(verbose, quiet)
    ctx.obj = GlobalOptions(verbose=verbose, quiet=quiet, config=config, lock=lock)


def _setup_logging(verbose: int, quiet: bool) -> None:
    # Lines on stderr, control characters escaped (core/log.py); logging itself is imported
    # only when a line must be written: an up-to-date build writes none (issue 18).
    configure(WARNING if quiet else (DEBUG if verbose else INFO))


def main(argv=None) -> None:
    verbose = any(a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"})
                  for a in (argv if argv is not None else sys.argv[1:]))
    try:
        rv = cli.main(args=argv, prog_name="pylmserv", standalone_mode=False)
    except PylmservError as exc:
        if verbose:
            import traceback
            traceback.print_exc()
        # Messages quote configs, servers and archives: no raw ESC/BEL reaches the terminal.
        click.echo(f"error: {show(exc.message, lines=True)}", err=True)
        if exc.hint:
            click.echo(f"hint: {show(exc.hint, lines=True)}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        # The environment refused a write or a path (read-only store, permissions,
        # over-long names): one line naming the path, not a traceback.
        err = _os_error(exc)
        if err is None:
            raise
        if verbose:
            import traceback
            traceback.print_exc()
        click.echo(f"error: {err.message}", err=True)
        click.echo(f"hint: {err.hint}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


def _os_error(exc: OSError) -> Optional[PylmservError]:
    import errno

    hints = {
        errno.EROFS: "The store (or output) is on a read-only filesystem: set PYLMSERV_HOME to a writable "
                     "directory, or use commands that only read it (list, fetch --offline of fetched models).",
        errno.EACCES: "Check the permissions, or set PYLMSERV_HOME to a directory you own.",
        errno.EPERM: "Check the permissions, or set PYLMSERV_HOME to a directory you own.",
        errno.ENAMETOOLONG: "Use a shorter name or path.",
        errno.ENOTDIR: "A path component that must be a directory is a file: check PYLMSERV_HOME and the paths given.",
        errno.ELOOP: "A symlink loop is in the way: check the paths given.",
        errno.EISDIR: "A directory is where a file belongs: check PYLMSERV_HOME and the paths given.",
        errno.EEXIST: "Something is in the way where pylmserv makes a directory: check PYLMSERV_HOME and the "
                      "paths given.",
        errno.EBUSY: "The file is busy or a mount point (a file bind-mounted into a container cannot be "
                     "replaced): write it outside the mount, or run the command where it is not mounted.",
        errno.ENOSPC: "Free some space (see `pylmserv doctor`) and run the command again.",
    }
    hint = hints.get(exc.errno)
    if hint is None:
        return None
    where = f": {exc.filename}" if exc.filename else ""
    if len(where) > 240:
        where = where[:120] + " ... " + where[-100:]
    return PylmservError(f"{exc.strerror}{where}", hint=hint, exit_code=2)
