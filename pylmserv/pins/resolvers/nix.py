"""Backend nix: nix-prefetch-url (flat, --unpack) and nix-prefetch-git, output parsed."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

from ...core.errors import NetworkError, ToolMissingError, VerificationError
from ...core.hashing import Hash
from ...core.log import get_logger
from ...core.proc import run_tool
from .base import Fetch, Hashed

log = get_logger("pylmserv.prefetch")
TIMEOUT = 3600


# Messages of a Nix that could not run at all here (no daemon, no store access, settings):
# it checked nothing, so auto keeps Python's answer and says so. Anything else is Nix
# refusing the input, and auto refuses the pin.
_SETUP_ERRORS = ("cannot open connection to remote store", "opening lock file '/nix/", "getting status of '/nix/",
                 "creating directory '/nix/", "Permission denied", "experimental Nix feature",
                 "error: unknown setting", "cannot connect to socket")


def is_setup_error(message: str) -> bool:
    return any(marker in message for marker in _SETUP_ERRORS)


def tool_for(fetch: Fetch) -> str:
    return "nix-prefetch-git" if fetch.kind == "git" else "nix-prefetch-url"


def available(fetch: Fetch) -> bool:
    return shutil.which(tool_for(fetch)) is not None


def store_name(url: str) -> str:
    """A valid store path name from a URL's last component (Nix allows [A-Za-z0-9+-._?=])."""
    base = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "source"
    name = re.sub(r"[^A-Za-z0-9+._?=-]", "_", base).lstrip(".") or "source"
    return name[:200]


def _run(args: List[str]) -> str:
    proc = run_tool(args, timeout=TIMEOUT, timeout_error=NetworkError,
                    missing_hint="Install Nix (and nix-prefetch-git from nixpkgs), or use --via python.")
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise NetworkError(f"{args[0]} failed: {lines[-1].strip() if lines else 'exit ' + str(proc.returncode)}",
                           hint="Check the URL / rev; run the command by hand for details.")
    return proc.stdout


def hash_fetch(fetch: Fetch, work: Path) -> Hashed:
    if fetch.kind == "git":
        args = ["nix-prefetch-git", "--quiet", "--url", fetch.url, "--rev", fetch.rev or "HEAD"]
        if fetch.submodules:
            args.append("--fetch-submodules")
        # With submodules fetchgit's checkout is builtins.fetchGit's tree too: name the builtin.
        return Hashed(parse_prefetch_git(_run(args)), fetcher="builtins.fetchGit" if fetch.submodules else "fetchgit")
    if fetch.headers:
        raise ToolMissingError("nix-prefetch-url cannot send the authentication this download needs",
                               hint="Use --via python for gated / private files.")
    args = ["nix-prefetch-url", "--type", "sha256", "--print-path", "--name", store_name(fetch.url)]
    if fetch.kind == "archive":
        args.append("--unpack")
    h, path = parse_prefetch_url(_run(args + [fetch.url]))
    size = os.path.getsize(path) if fetch.kind == "file" and path and os.path.isfile(path) else None
    return Hashed(h, size)


def parse_prefetch_url(stdout: str):
    """nix-prefetch-url prints the nix32 hash, then (with --print-path) the store path."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise NetworkError("nix-prefetch-url printed no hash")
    path: Optional[str] = lines[1] if len(lines) > 1 else None
    return Hash.parse(lines[0], algo="sha256"), path


def parse_prefetch_git(stdout: str) -> Hash:
    """nix-prefetch-git's JSON: `hash` (SRI, newer versions) or `sha256` (nix32, older)."""
    start = stdout.find("{")
    try:
        data = json.loads(stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not (data.get("hash") or data.get("sha256")):
        raise NetworkError("nix-prefetch-git printed no JSON with a hash", hint="Run it by hand to see why.")
    if data.get("hash"):
        return Hash.parse(data["hash"])
    return Hash.parse(data["sha256"], algo="sha256")


def cross_check(fetch: Fetch, ours: Hashed, theirs: Hashed) -> None:
    if ours.hash != theirs.hash:
        raise VerificationError(
            f"{fetch.name}: pylmserv computed {ours.hash.sri} but {tool_for(fetch)} says {theirs.hash.sri}",
            hint="Please report this as a pylmserv bug; meanwhile --via nix uses Nix's answer.")
    log.debug("%s: cross-checked with %s", fetch.name, tool_for(fetch))
