"""Running external tools: one runner, one way to stop a whole process tree.

Every child runs in its own process group (`start_new_session`), so stopping it means
signalling the group: `cmake --build` does not pass SIGTERM on to ninja, git leaves
git-remote-http behind, a server may fork workers. `stop_group` sends SIGTERM, waits,
then SIGKILLs whatever of the group is left.

- run_tool(argv, timeout=...)  a tool whose output we need: arg list, stdin closed,
                               stdout+stderr captured, the tree killed at the timeout.
- probe(argv, timeout=...)     the same, but never raises (doctor's and detectors' checks).
- start_group(argv, ...)       a long-running child (a server, a logged build step).
- stop_group(proc, grace)      the one way to stop a child and everything under it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Callable, Iterator, Mapping, Optional, Sequence, Type

from .errors import PylmservError, ToolMissingError
from .log import get_logger

log = get_logger("pylmserv.proc")

STOP_GRACE_S = 10.0


def which(name: str, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """`name` on env's PATH (os.environ's by default)."""
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    return shutil.which(name, path=path)


def run_tool(argv: Sequence[str], *, timeout: float, cwd=None, env: Optional[Mapping[str, str]] = None,
             missing_hint: str = "Install it, or put it on PATH.",
             timeout_error: Type[PylmservError] = PylmservError, timeout_hint: Optional[str] = None,
             what: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run `argv` (argv[0] looked up on PATH) and return its CompletedProcess (text).

    Raises ToolMissingError when argv[0] is not found and `timeout_error` when it runs
    past `timeout` (its whole process group is killed first). A non-zero exit is returned,
    not raised: callers turn the captured stderr into their own one-line error."""
    argv = [str(a) for a in argv]
    what = what or os.path.basename(argv[0])
    exe = which(argv[0], env)
    if exe is None:
        raise ToolMissingError(f"{argv[0]} is not on PATH", hint=missing_hint)
    log.debug("$ %s", " ".join(argv))
    try:
        proc = start_group([exe, *argv[1:]], cwd=cwd, env=None if env is None else dict(env),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as exc:
        raise ToolMissingError(f"cannot run {argv[0]}: {exc.strerror}", hint=missing_hint) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace=2.0)
        raise timeout_error(f"{what} timed out after {timeout:.0f}s", hint=timeout_hint) from None
    except BaseException:
        stop_group(proc, grace=2.0)
        raise
    if proc.returncode != 0:
        log.debug("%s exited %d: %s", what, proc.returncode, err.strip()[-2000:])
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def probe(argv: Sequence[str], *, timeout: float, env: Optional[Mapping[str, str]] = None) -> Optional[subprocess.CompletedProcess]:
    """Run a check command; None when it cannot start or runs past `timeout` (never raises)."""
    try:
        return run_tool(argv, timeout=timeout, env=env)
    except PylmservError:
        return None


def start_group(argv: Sequence[str], **popen) -> subprocess.Popen:
    """Popen `argv` as the leader of a new process group (stdin closed unless given)."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(list(argv), start_new_session=True, **popen)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Does any process of the group still run? (Zombies awaiting their reaper run nothing.)"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True
    return any(True for _ in running_members(pgid))


def running_members(pgid: int) -> Iterator[int]:
    """PIDs of non-zombie processes in process group `pgid` (Linux /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields after "(comm)": state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            yield int(entry)


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S, sig: int = signal.SIGTERM) -> Optional[int]:
    """Stop a child started by start_group and every process of its group: `sig`, up to
    `grace` seconds for the leader, then SIGTERM/SIGKILL for whatever of the group is left
    (a leader that exited may have left children). Returns the leader's exit code."""
    pgid = proc.pid  # start_new_session: the child leads its own group
    if proc.poll() is None or group_alive(pgid):
        signal_group(pgid, sig)
        _wait(lambda: proc.poll() is not None, grace)
        if group_alive(pgid):
            if proc.poll() is None:
                log.warning("%s did not stop within %.0fs; killing it", os.path.basename(str(proc.args[0])), grace)
            else:
                signal_group(pgid, signal.SIGTERM)
                _wait(lambda: not group_alive(pgid), min(grace, 2.0))
            signal_group(pgid, signal.SIGKILL)
            _wait(lambda: proc.poll() is not None and not group_alive(pgid), 5.0)
    try:
        return proc.wait(timeout=max(grace, 1.0))
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        return None


def _wait(done: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
