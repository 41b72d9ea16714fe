"""`pylmserv serve NAME... --generate systemd`: a systemd unit that runs the same serve.

What the unit holds, resolved now so that it runs unattended: the interpreter and the
pylmserv it imports, the store (PYLMSERV_HOME), the config and lock, the backend, the
llama-server binary of an existing build (the unit never builds or downloads: --offline),
the loopback bind. The API key travels as a credential (LoadCredential=, read by serve from
%d, the unit's credentials directory): its text is never in the unit.

Hardening a reviewer expects: NoNewPrivileges, ProtectSystem=strict with the store's logs
the only writable path (the store itself read-only through ProtectHome=read-only or
ProtectSystem), PrivateTmp (where serve writes the router's preset), loopback-only
networking (RestrictAddressFamilies, IPAddressAllow=localhost), and the usual Protect*.
"""
from __future__ import annotations

import getpass
import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..builders import resolve_backend
from ..core.errors import PylmservError, UsageError
from ..pins.config import load_project
from ..store import layout
from .serve import (ServeOptions, check_api_key, check_extra_args, check_router_extra_args,
                    check_router_settings, existing_build_targets, is_loopback, resolve_server)
from .fetch_models import fetch

SCOPES = ("user", "system")
CREDENTIAL = "pylmserv-api-key"  # LoadCredential= name; serve reads %d/<this>

# Hardening that holds for every backend; PrivateDevices only where no GPU device is needed.
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=read-only",
    "PrivateTmp=yes",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "IPAddressDeny=any",
    "IPAddressAllow=localhost",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "SystemCallArchitectures=native",
    "UMask=0077",
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def quote_arg(arg: str) -> str:
    """One ExecStart= word: specifiers (%) and variables ($) escaped, quoted when needed."""
    if _CONTROL.search(arg):
        raise UsageError(f"cannot put {arg!r} into a systemd unit: it holds a control character")
    text = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{text}"' if (not text or re.search(r"[\s;'\"]", arg)) else text


def quote_setting(value: str) -> str:
    """A value of Environment=/LoadCredential=/ReadWritePaths=: specifiers escaped, quoted."""
    if _CONTROL.search(value):
        raise UsageError(f"cannot put {value!r} into a systemd unit: it holds a control character")
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def _pythonpath() -> Optional[str]:
    """The directory this pylmserv is imported from, when the interpreter would not find it alone."""
    import site

    here = str(Path(__file__).resolve().parents[2])
    default = {str(Path(p).resolve()) for p in site.getsitepackages() + [site.getusersitepackages()]}
    return None if here in default else here


def systemd_unit(opts: ServeOptions, names: Sequence[str], scope: str = "user", api_key_file: Optional[Path] = None,
                 all_models: bool = False, config: Optional[Path] = None, lock: Optional[Path] = None) -> str:
    """The unit text; everything it names is checked now (models fetched and verified, a
    build present), so that starting it cannot need the network or a compiler."""
    if scope not in SCOPES:
        raise UsageError(f"unknown unit scope {scope!r}", hint="Use --user or --system.")
    if not is_loopback(opts.host) or opts.public:
        raise UsageError(f"a generated unit binds loopback only, not {opts.host}",
                         hint="Leave out --host/--public; put a reverse proxy with TLS in front to share it.")
    if opts.api_key and api_key_file is None:
        raise UsageError("--generate systemd takes the key from --api-key-file, never as text",
                         hint="Write the key to a file only root (or you) can read and pass --api-key-file FILE: "
                              "the unit loads it as a credential (LoadCredential=).")
    if not 0 < opts.port < 65536:
        raise UsageError(f"bad port {opts.port}", hint="Use a port between 1 and 65535.")
    check_extra_args(opts.extra_args)
    check_api_key(opts.api_key)
    if opts.router is not None:
        check_router_settings(opts.router)
        check_router_extra_args(opts.extra_args)
    project = load_project(config, lock)
    config_path, lock_path = project.config_path, project.lock_path
    known = set(project.config.models) | set(project.lock.models)
    for name in names:
        if name not in known:
            raise UsageError(f"unknown model {name!r}: a unit serves models of the lock by name",
                             hint=f"Use one of: {', '.join(sorted(known))}.")
    try:
        fetch(list(names), config=config, lock=lock, offline=True, progress=False)  # present and verified
    except PylmservError as exc:
        raise UsageError(f"{exc.message} (a unit never downloads)",
                         hint=f"Run `pylmserv fetch {' '.join(names)}` first, then generate the unit again.") from None
    server, backend = _server(opts, config, lock)
    home = layout.home().resolve()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    argv: List[str] = [sys.executable, "-m", "pylmserv", "--config", str(Path(config_path).resolve()),
                       "--lock", str(Path(lock_path).resolve()), "serve"]
    argv += ["--all"] if all_models else list(names)
    argv += ["--host", opts.host, "--port", str(opts.port), "--engine", opts.engine, "--offline",
             "--server-bin", str(server), "--timeout", f"{opts.health_timeout:g}"]
    if opts.ngl is not None:
        argv += ["--ngl", str(opts.ngl)]
    router = opts.router
    if router is not None:
        if router.max_loaded is not None:
            argv += ["--max-loaded", str(router.max_loaded)]
        if router.idle_unload is not None:
            argv += ["--idle-unload", str(router.idle_unload)]
        for name in router.pin:
            argv += ["--pin", name]
        for name in router.preload:
            argv += ["--preload", name]
    exec_start = " ".join(quote_arg(a) for a in argv)
    if api_key_file is not None:
        exec_start += f" --api-key-file %d/{CREDENTIAL}"  # %d: the credentials directory
    if opts.extra_args:
        exec_start += " -- " + " ".join(quote_arg(a) for a in opts.extra_args)

    shown = ", ".join(names) if not all_models else "every model of " + str(Path(lock_path).resolve())
    lines = ["# Written by `pylmserv serve --generate systemd`: " + ("a user unit (~/.config/systemd/user/)"
             if scope == "user" else "a system unit (/etc/systemd/system/)") + ".",
             "[Unit]", f"Description=pylmserv: {quote_setting(shown)} on http://127.0.0.1:{opts.port}/v1"]
    if scope == "system":
        lines += ["After=network.target"]
    lines += ["", "[Service]", "Type=exec"]
    if scope == "system" and os.geteuid() != 0:
        lines.append(f"User={getpass.getuser()}")
    lines.append(f'Environment="PYLMSERV_HOME={quote_setting(str(home))}"')
    pythonpath = _pythonpath()
    if pythonpath:
        lines.append(f'Environment="PYTHONPATH={quote_setting(pythonpath)}"')
    if api_key_file is not None:
        lines.append(f"LoadCredential={CREDENTIAL}:{quote_setting(str(Path(api_key_file).expanduser().resolve()))}")
    lines += [f"ExecStart={exec_start}",
              "KillMode=mixed",  # SIGTERM to serve, which stops the server's whole group in order
              "TimeoutStopSec=30",
              "Restart=on-failure",
              "RestartSec=5",
              "",
              "# Hardening: the store read-only, its logs the only writable path, loopback only."]
    lines += list(HARDENING)
    lines.append(f"ReadWritePaths={quote_setting(str(logs))}")
    if backend in ("cpu", "blas"):  # a GPU backend (or one not known: auto) needs /dev of the GPU
        lines.append("PrivateDevices=yes")
    lines += ["", "[Install]", f"WantedBy={'default.target' if scope == 'user' else 'multi-user.target'}", ""]
    return "\n".join(lines)


def _server(opts: ServeOptions, config, lock):
    """(llama-server, backend) the unit runs: --server-bin (backend as given), else a build that
    exists now of the resolved backend (never built here)."""
    explicit = opts.server_bin or os.environ.get("PYLMSERV_SERVER_BIN")
    if explicit:
        return resolve_server(opts.engine, opts.backend, Path(explicit), config, lock).resolve(), opts.backend
    backend = opts.backend
    if opts.engine == "llama.cpp":
        backend, _ = resolve_backend(opts.engine, opts.backend, config=config, lock=lock)
        if existing_build_targets(backend, config, lock) is None:
            raise UsageError(f"no {backend} build of the locked llama.cpp with llama-server yet: the unit never builds",
                             hint=f"Run `pylmserv build --backend {backend} --target llama-server` first "
                                  "(or pass --server-bin).")
    return resolve_server(opts.engine, backend, None, config, lock).resolve(), backend
