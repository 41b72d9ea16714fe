"""`pylmserv serve`: run llama-server (or a llamafile) on a model, on loopback by default.

The server runs in its own process group, so one signal stops it and everything it
started; Ctrl-C / SIGTERM given to pylmserv are forwarded there, and on any exit path
(including pylmserv being killed, via PR_SET_PDEATHSIG on Linux) the group is stopped.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..builders import binfmt, build, resolve_backend, stored_llama_source
from ..builders.llama_cpp import MAPPING_VERSION
from ..builders.result import BuildResult
from ..core import proc as proc_tools
from ..core.errors import PylmservError, UsageError
from ..core.log import get_logger
from ..pins.config import load_project
from ..store import records as stamps
from ..store import layout
from .fetch_models import fetch

log = get_logger("pylmserv.serve")

ENGINES = ("llama.cpp", "llamafile")
SERVER_BIN_ENV = "PYLMSERV_SERVER_BIN"  # an explicit llama-server (or llamafile) to run
STOP_GRACE_S = 10.0  # after SIGINT/SIGTERM, how long the server gets before SIGKILL


@dataclass(frozen=True)
class ServeOptions:
    """Everything `serve` needs, resolved once by the CLI (or a caller) and passed down."""

    model: str
    backend: str = "auto"  # resolved by builders.resolve_backend when the server is built
    engine: str = "llama.cpp"
    host: str = "127.0.0.1"
    port: int = 8080
    ngl: Optional[int] = None
    public: bool = False
    api_key: Optional[str] = None
    extra_args: Tuple[str, ...] = ()
    server_bin: Optional[Path] = None
    health_timeout: float = 300.0
    offline: bool = False
    log_file: Optional[Path] = None  # None: the server's output goes to our stderr
    stop_grace: float = STOP_GRACE_S
    router: Optional["RouterSettings"] = None  # set: many models behind one endpoint (router mode)


@dataclass(frozen=True)
class ServeUrls:
    base: str

    @property
    def api(self) -> str:
        return self.base + "/v1"

    @property
    def health(self) -> str:
        return self.base + "/health"


# -- validation -------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, public: bool, api_key: Optional[str]) -> None:
    """Refuse a non-loopback bind unless --public was given."""
    if is_loopback(host) or public:
        if not is_loopback(host) and not api_key:
            log.warning("warning: serving on %s without --api-key: anyone on the network can use it", host)
        return
    raise UsageError(f"refusing to bind {host}: it is reachable from other machines",
                     hint=f"Pass --public to serve on {host} on purpose, and --api-key KEY so that only "
                          "clients with the key can use it; or keep the default --host 127.0.0.1.")


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                             hint="Another server is using that port: stop it or pass --port N.") from None


def urls_for(host: str, port: int) -> ServeUrls:
    # Clients reach a wildcard bind through loopback; name that, not 0.0.0.0.
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in shown:
        shown = f"[{shown}]"
    return ServeUrls(f"http://{shown}:{port}")


# -- resolving the model and the engine -----------------------------------------------

def resolve_model(model: str, config: Optional[Path] = None, lock: Optional[Path] = None,
                  offline: bool = False) -> Path:
    """A .gguf path as given, or a catalog name fetched (verified) into the store."""
    candidate = Path(model).expanduser()
    looks_like_path = os.sep in model or model.endswith((".gguf", ".llamafile"))
    if looks_like_path:
        if not candidate.is_file():
            raise UsageError(f"model file not found: {model}",
                             hint="Give an existing .gguf file or a catalog name (see `pylmserv list`).")
        return candidate.resolve()

    project = load_project(config, lock)
    if model not in project.config.models and model not in project.lock.models:
        names = ", ".join(sorted(set(project.config.models) | set(project.lock.models)))
        raise UsageError(f"unknown model {model!r}", hint=f"Use a .gguf path or one of: {names}.")

    results = fetch([model], config=config, lock=lock, offline=offline)
    return Path(results[0].path)


def resolve_server(engine: str, backend: str, server_bin: Optional[Path] = None,
                   config: Optional[Path] = None, lock: Optional[Path] = None) -> Path:
    """The server binary: --server-bin, $PYLMSERV_SERVER_BIN, else build (a no-op when up to date)."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}", hint="Use --engine llama.cpp or --engine llamafile.")
    explicit = server_bin or os.environ.get(SERVER_BIN_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UsageError(f"server binary not found or not executable: {path}",
                             hint=f"Point --server-bin (or ${SERVER_BIN_ENV}) at a llama-server executable.")
        return path

    backend, _ = resolve_backend(engine, backend, config=config, lock=lock)
    kwargs = {"what": engine, "backend": backend, "config": config, "lock": lock}
    if engine == "llama.cpp":
        # Reuse a finished build of the locked source that has llama-server (e.g. from
        # `pylmserv build`, whatever targets it had); else build just llama-server.
        kwargs["targets"] = existing_build_targets(backend, config, lock) or ("llama-server",)
    result = build(**kwargs)
    return pick_server_binary(engine, result)


def existing_build_targets(backend: str, config: Optional[Path] = None, lock: Optional[Path] = None
                           ) -> Optional[Tuple[str, ...]]:
    """Targets of an up-to-date llama.cpp build of the locked source that includes llama-server.

    Calling build() with those targets is then a cache hit: no second build for `serve`.
    """
    entry = load_project(config, lock).lock.entry("sources", "llama-cpp")
    if entry is None:
        return None
    stamp = stamps.newest_build(layout.build_dirs("llama.cpp", backend, layout.home()),
                                {"source": entry.hash.sri, "mapping": MAPPING_VERSION},  # older mappings rebuild
                                output="llama-server")
    targets = tuple(stamp.inputs.get("targets") or ()) if stamp else ()
    return targets or None


def pick_server_binary(engine: str, result: BuildResult) -> Path:
    """Find llama-server (or the llamafile) among a BuildResult's installed binaries."""
    wanted = ("llama-server",) if engine == "llama.cpp" else ("llamafile",)
    for name, path in result.binaries.items():
        if Path(str(name)).name in wanted or Path(str(path)).name in wanted:
            return Path(path)
    raise PylmservError(f"the {engine} build has no {wanted[0]} binary",
                        hint=f"Rebuild with `pylmserv build {engine} --target {wanted[0]}`.")


BINFMT_DIR_ENV = "PYLMSERV_BINFMT_DIR"  # where binfmt_misc is read (default /proc/sys/fs/binfmt_misc)


def _needs_shell(binary: Path, binfmt_dir: Optional[Path] = None) -> bool:
    """An APE (a llamafile) that execve() would hand to WINE or refuse (Linux binfmt_misc)."""
    if not sys.platform.startswith("linux"):
        return False

    directory = binfmt_dir or os.environ.get(BINFMT_DIR_ENV) or None
    return binfmt.is_ape(binary) and not binfmt.read_binfmt(directory).direct_exec_ok


# Options pylmserv owns: set after `--` they would override the checked bind address
# (llama-server and llamafile take the last --host/--port) or put a key into `ps`.
OWNED_FLAGS = ("--host", "--port", "--api-key", "--api-key-file")
# Their environment spellings (llama-server reads LLAMA_ARG_*): never inherited by the child.
OWNED_ENV = ("LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_API_KEY", "LLAMA_ARG_API_KEY_FILE", "PYLMSERV_API_KEY")


def check_extra_args(extra_args: Sequence[str]) -> None:
    """Refuse server arguments after `--` that would bypass the bind check or leak a key."""
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            own = "--api-key" if flag.startswith("--api-key") else flag
            raise UsageError(f"refusing server argument {arg.split('=', 1)[0]!r} after `--`: pylmserv sets it",
                             hint=f"Use `pylmserv serve {own} ...` instead: the bind address is checked by the "
                                  "loopback rule (--public), and the API key never goes on the command line.")


def check_api_key(key: Optional[str]) -> None:
    """A key the servers read back as exactly one key: llama-server splits --api-key (and
    LLAMA_API_KEY) on commas, key files are one key per line and skip '#' lines."""
    if key is None:
        return
    if not key or "," in key or key.startswith("#") or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise UsageError("unusable --api-key: it must be one token without commas, spaces or control characters, "
                         "not starting with '#'",
                         hint="llama-server would split it into several (weaker) keys; use e.g. "
                              "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`.")


def server_command(server: Path, model_path: Path, opts: ServeOptions, key_file: Optional[Path] = None) -> List[str]:
    """llama-server's (or llamafile's --server) argument list. Never the API key itself:
    llama-server reads it from LLAMA_API_KEY (server_env), llamafile 0.8.4 from `key_file`."""
    argv = [str(server)]
    if opts.engine == "llamafile":
        argv += ["--server", "--nobrowser"]
    argv += ["-m", str(model_path), "--host", opts.host, "--port", str(opts.port)]
    if opts.ngl is not None:
        argv += ["-ngl", str(opts.ngl)]
    if opts.api_key and opts.engine == "llamafile":
        if key_file is None:
            raise ValueError("llamafile needs the API key in a file")
        argv += ["--api-key-file", str(key_file)]
    argv += list(opts.extra_args)
    return argv


def server_env(opts: ServeOptions, base: Optional[dict] = None) -> dict:
    """The child's environment: the API key for llama-server (LLAMA_API_KEY), none stray."""
    env = dict(os.environ if base is None else base)
    for name in OWNED_ENV:
        env.pop(name, None)
    if opts.api_key and opts.engine != "llamafile":
        env["LLAMA_API_KEY"] = opts.api_key
    return env


@contextlib.contextmanager
def api_key_file(opts: ServeOptions):
    """A mode-0600 file with the key in a private (0700) directory, removed afterwards;
    None when there is no key or the engine reads it from the environment."""
    if not opts.api_key or opts.engine != "llamafile":
        yield None
        return
    directory = Path(tempfile.mkdtemp(prefix="pylmserv-key."))  # mkdtemp: mode 0700
    path = directory / "api-key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(opts.api_key + "\n")
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the process ---------------------------------------------------------------------------

def _pdeathsig_setup() -> Optional[Callable[[], None]]:
    """A preexec function that makes the child die with pylmserv, even on SIGKILL (Linux).

    Resolved in the parent: the child, between fork and exec, only calls prctl.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def setup() -> None:  # pragma: no cover - runs in the child
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return setup


class ServerProcess:
    """A server in its own process group; stop() leaves no process of that group behind."""

    def __init__(self, argv: Sequence[str], log_file: Optional[Path] = None, env: Optional[dict] = None):
        self.argv = list(argv)
        self.log_file = log_file
        self._log_handle = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(log_file, "ab")
        out = self._log_handle if self._log_handle is not None else None
        try:
            self.proc = proc_tools.start_group(self.argv, stdout=out or sys.stderr.fileno(),
                                               stderr=subprocess.STDOUT if out else None,
                                               preexec_fn=_pdeathsig_setup(), env=env)
        except OSError as exc:
            self._close_log()
            raise PylmservError(f"cannot start {self.argv[0]}: {exc.strerror}",
                                hint="Check that the binary exists and runs on this machine (`pylmserv doctor`).") from None
        self.pgid = self.proc.pid  # start_new_session: the child leads its own group

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def signal_group(self, sig: int) -> None:
        proc_tools.signal_group(self.pgid, sig)

    def group_alive(self) -> bool:
        """Does any process of the group still run? (Zombies awaiting their reaper run nothing.)"""
        return proc_tools.group_alive(self.pgid)

    def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> Optional[int]:
        """Signal the group, give the server `grace` seconds, then SIGKILL what remains of it."""
        code = proc_tools.stop_group(self.proc, grace=grace, sig=sig)
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def log_tail(self, lines: int = 15) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


def wait_healthy(server: ServerProcess, url: str, timeout: float, api_key: Optional[str] = None,
                 interval: float = 0.2, cancelled: Callable[[], bool] = lambda: False) -> bool:
    """Poll GET /health until 200 (503 means the model is still loading).

    True when ready, False when `cancelled()` turned true (e.g. Ctrl-C while loading).
    """
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last = "no answer yet"
    while not cancelled():
        code = server.poll()
        if code is not None:
            if cancelled():
                break
            tail = server.log_tail()
            raise PylmservError(f"the server exited with status {code} before it was ready"
                                + (f"; its last output:\n{tail}" if tail else ""),
                                hint=f"See {server.log_file} for the full log." if server.log_file else
                                "Its output is above; run with -v for more.")
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return True
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"  # 503 while loading
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() > deadline:
            raise PylmservError(f"the server did not become ready within {timeout:.0f}s ({url}: {last})",
                                hint="A large model may need longer: pass --timeout SECONDS.")
        time.sleep(interval)
    return False


@dataclass
class _Stop:
    signum: Optional[int] = None
    handlers: dict = field(default_factory=dict)


def run_server(argv: Sequence[str], opts: ServeOptions, on_ready: Callable[[ServeUrls], None],
               env: Optional[dict] = None,
               after_health: Optional[Callable[["ServerProcess", ServeUrls, Callable[[], bool]], bool]] = None) -> int:
    """Start the server, wait for /health, call on_ready, block until it exits or we are signalled.

    Returns the exit status for the CLI: 130 when stopped by SIGINT/SIGTERM, else the
    server's own status. No process of the server's group survives this call.
    """
    urls = urls_for(opts.host, opts.port)
    stop = _Stop()

    def on_signal(signum, frame):
        if stop.signum is not None:  # second Ctrl-C: stop waiting politely
            server.signal_group(signal.SIGKILL)
            return
        stop.signum = signum
        server.signal_group(signum)  # forward: llama-server shuts down cleanly on SIGINT/SIGTERM

    server = ServerProcess(argv, log_file=opts.log_file, env=env)
    in_main = _is_main_thread()
    try:
        if in_main:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                stop.handlers[sig] = signal.signal(sig, on_signal)
        log.debug("started %s (pid %d)", " ".join(argv), server.pid)
        ready = wait_healthy(server, urls.health, opts.health_timeout, api_key=opts.api_key,
                             cancelled=lambda: stop.signum is not None)
        if ready and after_health is not None:  # e.g. the router's preloaded models
            ready = after_health(server, urls, lambda: stop.signum is not None)
        if ready:
            on_ready(urls)
        while server.poll() is None and stop.signum is None:
            time.sleep(0.1)
        code = server.stop(signal.SIGTERM if stop.signum is None else stop.signum, grace=opts.stop_grace)
        if stop.signum is not None:
            return 130
        if code is None:
            return 1
        return 128 - code if code < 0 else code  # killed by a signal: shell convention 128+N
    finally:
        server.stop(grace=opts.stop_grace)  # idempotent: nothing of the group is left on error paths either
        for sig, old in stop.handlers.items():
            signal.signal(sig, old)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def default_log_file(port: int) -> Path:
    return layout.logs_dir() / f"llama-server-{port}.log"



# -- the API key from a file (systemd's LoadCredential=, a secrets manager) -----------------

API_KEY_FILE_MAX = 4096


def read_api_key_file(path: Path) -> str:
    """The one key in `path` (a trailing newline is dropped); its text never reaches argv or logs."""
    try:
        with open(Path(path).expanduser(), "rb") as f:
            data = f.read(API_KEY_FILE_MAX + 1)
    except OSError as exc:
        raise UsageError(f"cannot read --api-key-file {path}: {exc.strerror}",
                         hint="Point it at a readable file holding one key on one line.") from None
    if len(data) > API_KEY_FILE_MAX:
        raise UsageError(f"--api-key-file {path} is larger than {API_KEY_FILE_MAX} bytes: not one key",
                         hint="The file holds exactly one key on one line.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--api-key-file {path} is not UTF-8 text", hint="The file holds exactly one key.") from None
    key = text[:-1] if text.endswith("\n") else text
    key = key[:-1] if key.endswith("\r") else key
    if not key:
        raise UsageError(f"--api-key-file {path} is empty", hint="Write one key into it, e.g. "
                         "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`.")
    check_api_key(key)
    return key


# -- per-model settings from pylmserv.toml (role, [models.NAME.server]) ---------------------

def _ini_value(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def settings_args(role: str, server: Dict[str, object]) -> List[str]:
    """The llama-server arguments of a model's `role` and [models.NAME.server] (one-model mode)."""
    argv = ["--embeddings"] if role == "embedding" else []
    for key, value in server.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


# -- many models behind one endpoint: llama-server's router mode ------------------------------

ROUTER_FLAG = "--models-preset"  # what a llama.cpp with router presets declares (common/arg.cpp)
ROUTER_SINCE = ("llama.cpp with router presets (ggml-org/llama.cpp PR #17859, December 2025; the oldest "
                "llama-cpp-python sdist vendoring one is 0.3.17, llama.cpp 49bfddeca)")
# What the router of the pinned llama.cpp cannot do, said instead of emulated.
NO_PIN_WITH_LIMIT = ("this llama.cpp's router evicts the least recently used idle model when --max-loaded is reached "
                     "and has no setting that exempts one (tools/server/server-models.cpp, pick_victim)")
# Flags after `--` that would replace the models pylmserv verified, or its own router settings.
ROUTER_OWNED_FLAGS = ("-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-a", "--alias",
                      "--models-dir", "--models-preset", "--models-max", "--models-autoload", "--no-models-autoload",
                      "--sleep-idle-seconds")


@dataclass(frozen=True)
class RouterSettings:
    """`serve NAME NAME...` / `serve --all`: the models and how the router treats them."""

    names: Tuple[str, ...]
    max_loaded: Optional[int] = None  # --models-max; None: llama.cpp's default (4); 0: no limit
    idle_unload: Optional[int] = None  # seconds: each model's sleep-idle-seconds (weights freed)
    pin: Tuple[str, ...] = ()  # loaded at start, never put to sleep
    preload: Tuple[str, ...] = ()  # loaded at start (load-on-startup)


@dataclass(frozen=True)
class RouterModel:
    name: str
    path: Path
    role: str = "chat"
    server: Dict[str, object] = field(default_factory=dict)


def check_router_settings(settings: RouterSettings) -> None:
    names = settings.names
    if not names:
        raise UsageError("no models to serve", hint="Name models from the lock, or pass --all.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"model named twice: {', '.join(dup)}", hint="Name each model once.")
    for n in names:
        if os.sep in n or n.endswith((".gguf", ".llamafile")):
            raise UsageError(f"{n}: several models are served by their catalog names only",
                             hint="Add the file to pylmserv.toml (`pylmserv add`) and serve it by name.")
    for flag, chosen in (("--pin", settings.pin), ("--preload", settings.preload)):
        for n in chosen:
            if n not in names:
                raise UsageError(f"{flag} {n}: not one of the models served ({', '.join(names)})",
                                 hint=f"Name it among the models too, or drop {flag}.")
    if settings.max_loaded is not None and settings.max_loaded < 0:
        raise UsageError(f"--max-loaded {settings.max_loaded}: must be 0 (no limit) or more")
    if settings.idle_unload is not None and settings.idle_unload < 1:
        raise UsageError(f"--idle-unload {settings.idle_unload}: must be at least 1 second",
                         hint="Leave it out to keep loaded models in memory.")
    limit = settings.max_loaded or 0
    if settings.pin and 0 < limit < len(names):
        raise UsageError(f"--pin cannot be kept with --max-loaded {limit}: {NO_PIN_WITH_LIMIT}",
                         hint=f"Drop --pin (--preload loads it at start), or raise --max-loaded to {len(names)} "
                              "(or 0) so that nothing is evicted.")
    at_start = set(settings.pin) | set(settings.preload)
    if 0 < limit < len(at_start):
        raise UsageError(f"{len(at_start)} models to load at start but --max-loaded {limit}",
                         hint="Preload fewer models or raise --max-loaded.")


def router_support(server: Path, source: Optional[Path]) -> bool:
    """Does this llama-server have router presets? Read from the source it was built from
    (common/arg.cpp declares --models-preset), else from the binary itself: the option's name
    is a string in it (or in the common library beside it, for a build with shared libraries).
    The binary is never run for this."""
    if source is not None and (Path(source) / "common" / "arg.cpp").is_file():
        text = (Path(source) / "common" / "arg.cpp").read_text(encoding="utf-8", errors="replace")
        return f'"{ROUTER_FLAG}"' in text
    server = Path(server)
    candidates = [server] + sorted(p for d in (server.parent, server.parent.parent / "lib") if d.is_dir()
                                   for p in d.glob("lib*common*.so*"))
    return any(_contains(path, ROUTER_FLAG.encode()) for path in candidates)


def _contains(path: Path, needle: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            tail = b""
            for chunk in iter(lambda: f.read(1 << 20), b""):
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle):]
    except OSError:
        return False
    return False


def check_router_support(server: Path, source: Optional[Path]) -> None:
    if not router_support(server, source):
        where = f"the llama.cpp source {source}" if source is not None else str(server)
        raise UsageError(f"cannot serve several models: {where} predates llama-server's router mode; "
                         f"it needs {ROUTER_SINCE}",
                         hint="Pin a newer llama.cpp (`pylmserv update llama-cpp`, or edit [sources.llama-cpp]), "
                              "or serve one model at a time.")


def check_router_extra_args(extra_args: Sequence[str]) -> None:
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in ROUTER_OWNED_FLAGS:
            raise UsageError(f"refusing server argument {flag!r} after `--` with several models: pylmserv sets it",
                             hint="The models come from the lock, verified; use --max-loaded, --idle-unload, "
                                  "--pin and --preload for the router's settings.")


def _ini_safe(text: str, what: str) -> str:
    import re

    if text != text.strip() or re.search(r"[\x00-\x1f\x7f]|[ \t][;#]|^[;#]", text):
        raise PylmservError(f"{what} {text!r} cannot be written into llama-server's preset file",
                            hint="Move the store (PYLMSERV_HOME) to a path without control characters, "
                                 "' ;' or ' #'.")
    return text


def models_preset(models: Sequence[RouterModel], settings: RouterSettings, ngl: Optional[int] = None) -> str:
    """The router's --models-preset INI: one section per model (its id is the pylmserv name),
    `[*]` for what every model shares. Router command-line arguments override a preset, so
    everything that varies per model lives here, not on the router's command line."""
    lines = ["; written by pylmserv serve: one section per model of the lock", "version = 1", "", "[*]"]
    if ngl is not None:
        lines.append(f"n-gpu-layers = {ngl}")
    if settings.idle_unload is not None:
        lines.append(f"sleep-idle-seconds = {settings.idle_unload}")
    for m in models:
        lines += ["", f"[{m.name}]", f"model = {_ini_safe(str(m.path), 'model path')}"]
        if m.role == "embedding":
            lines.append("embeddings = true")
        if m.name in settings.pin or m.name in settings.preload:
            lines.append("load-on-startup = true")
        if m.name in settings.pin and settings.idle_unload is not None:
            lines.append("sleep-idle-seconds = -1")
        for key, value in m.server.items():
            lines.append(f"{key} = {_ini_safe(_ini_value(value), key)}")
    return "\n".join(lines) + "\n"


def router_command(server: Path, preset: Path, opts: ServeOptions) -> List[str]:
    argv = [str(server), "--models-preset", str(preset), "--host", opts.host, "--port", str(opts.port)]
    settings = opts.router
    if settings is not None and settings.max_loaded is not None:
        argv += ["--models-max", str(settings.max_loaded)]
    return argv + list(opts.extra_args)


def router_env(opts: ServeOptions, empty_cache: Path, base: Optional[dict] = None) -> dict:
    """server_env, plus an empty model cache: the router lists every model of its cache
    (LLAMA_CACHE, else the Hugging Face cache), and only the lock's models are to be served."""
    env = server_env(opts, base)
    for name in list(env):
        if name.startswith("LLAMA_ARG_MODELS_") or name in ("LLAMA_ARG_SLEEP_IDLE_SECONDS",):
            env.pop(name)
    env["LLAMA_CACHE"] = str(empty_cache)
    return env


def resolve_router_models(names: Sequence[str], config: Optional[Path] = None, lock: Optional[Path] = None,
                          offline: bool = False) -> List[RouterModel]:
    """Every model fetched and verified into the store (before the router starts), with its
    per-model settings from pylmserv.toml."""
    project = load_project(config, lock)
    known = set(project.config.models) | set(project.lock.models)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown model {unknown[0]!r}", hint=f"Use names of the lock: {', '.join(sorted(known))}.")
    results = fetch(list(names), config=config, lock=lock, offline=offline)
    out = []
    for name, result in zip(names, results):
        spec = project.config.models.get(name)
        out.append(RouterModel(name, Path(result.path).resolve(), spec.role if spec else "chat",
                               dict(spec.server) if spec else {}))
    return out


def all_model_names(config: Optional[Path] = None, lock: Optional[Path] = None) -> Tuple[str, ...]:
    names = tuple(sorted(load_project(config, lock).lock.models))
    if not names:
        raise UsageError("--all: the lock has no models", hint="Add some (`pylmserv add`) and `pylmserv prefetch`.")
    return names


def wait_models_loaded(server: ServerProcess, urls: ServeUrls, names: Sequence[str], timeout: float,
                       api_key: Optional[str] = None, cancelled: Callable[[], bool] = lambda: False) -> bool:
    """Poll the router's GET /models until each of `names` (the preloaded ones) is loaded;
    a model whose load failed is an error naming it."""
    import json
    import urllib.error
    import urllib.request

    if not names:
        return True
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while not cancelled() and server.poll() is None:
        try:
            with urllib.request.urlopen(urllib.request.Request(urls.base + "/models", headers=headers),
                                        timeout=5) as resp:
                data = json.load(resp).get("data", [])
        except (urllib.error.URLError, OSError, ValueError):
            data = []
        status = {m.get("id"): m.get("status") or {} for m in data if isinstance(m, dict)}
        failed = [n for n in names if status.get(n, {}).get("failed")]
        if failed:
            tail = server.log_tail()
            raise PylmservError(f"model {failed[0]} failed to load" + (f"; the server's last output:\n{tail}" if tail else ""),
                                hint=f"See {server.log_file}." if server.log_file else "Its output is above.")
        if all(status.get(n, {}).get("value") == "loaded" for n in names):
            return True
        if time.monotonic() > deadline:
            raise PylmservError(f"the preloaded models did not load within {timeout:.0f}s",
                                hint="A large model may need longer: pass --timeout SECONDS.")
        time.sleep(0.2)
    return False


def serve_router(opts: ServeOptions, on_ready: Callable[[ServeUrls], None], config: Optional[Path] = None,
                 lock: Optional[Path] = None) -> int:
    """Many models behind one endpoint: fetch and verify them all, write the preset, run the router."""
    settings = opts.router
    assert settings is not None
    check_router_settings(settings)
    check_router_extra_args(opts.extra_args)
    if opts.engine != "llama.cpp":
        raise UsageError("several models need --engine llama.cpp (llama-server's router mode)",
                         hint="A llamafile serves one model: run one `pylmserv serve` per model.")
    models = resolve_router_models(settings.names, config, lock, offline=opts.offline)
    server = resolve_server(opts.engine, opts.backend, opts.server_bin, config, lock)
    explicit = opts.server_bin or os.environ.get(SERVER_BIN_ENV)
    check_router_support(server, None if explicit else stored_llama_source(config, lock))
    work = Path(tempfile.mkdtemp(prefix="pylmserv-router."))  # 0700; PrivateTmp under systemd
    try:
        preset = work / "models.ini"
        preset.write_text(models_preset(models, settings, opts.ngl), encoding="utf-8")
        empty_cache = work / "no-cache"
        empty_cache.mkdir()
        argv = router_command(server, preset, opts)
        log.info("serving %s with %s (router mode)", ", ".join(settings.names), server)
        at_start = [n for n in settings.names if n in settings.pin or n in settings.preload]

        def preloaded(server_process: ServerProcess, urls: ServeUrls, cancelled: Callable[[], bool]) -> bool:
            return wait_models_loaded(server_process, urls, at_start, opts.health_timeout, opts.api_key, cancelled)

        return run_server(argv, opts, on_ready, env=router_env(opts, empty_cache), after_health=preloaded)
    finally:
        shutil.rmtree(work, ignore_errors=True)

def with_model_settings(opts: ServeOptions, config: Optional[Path] = None, lock: Optional[Path] = None
                        ) -> ServeOptions:
    """One catalog model: its role and [models.NAME.server] go before the arguments after `--`."""
    from dataclasses import replace

    if os.sep in opts.model or opts.model.endswith((".gguf", ".llamafile")):
        return opts
    spec = load_project(config, lock).config.models.get(opts.model)
    args = settings_args(spec.role, spec.server) if spec is not None else []
    return replace(opts, extra_args=tuple(args) + tuple(opts.extra_args)) if args else opts


def serve(opts: ServeOptions, on_ready: Callable[[ServeUrls], None], config: Optional[Path] = None,
          lock: Optional[Path] = None) -> int:
    """Validate, fetch the model, build/find the server, run it until stopped."""
    if opts.engine not in ENGINES:
        raise UsageError(f"unknown engine {opts.engine!r}", hint="Use --engine llama.cpp or --engine llamafile.")
    if not 0 < opts.port < 65536:
        raise UsageError(f"bad port {opts.port}", hint="Use a port between 1 and 65535.")
    check_bind(opts.host, opts.public, opts.api_key)
    check_extra_args(opts.extra_args)
    check_api_key(opts.api_key)
    if opts.router is not None:
        check_router_settings(opts.router)
        check_router_extra_args(opts.extra_args)
        check_port_free(opts.host, opts.port)
        return serve_router(opts, on_ready, config, lock)
    check_port_free(opts.host, opts.port)
    model_path = resolve_model(opts.model, config, lock, offline=opts.offline)
    opts = with_model_settings(opts, config, lock)
    server = resolve_server(opts.engine, opts.backend, opts.server_bin, config, lock)
    with api_key_file(opts) as key_file:
        argv = server_command(server, model_path, opts, key_file)
        if opts.engine == "llamafile" and _needs_shell(server):
            argv = ["/bin/sh"] + argv  # APE files run as shell scripts when binfmt_misc cannot start them
        log.info("serving %s with %s", model_path, server)
        return run_server(argv, opts, on_ready, env=server_env(opts))
