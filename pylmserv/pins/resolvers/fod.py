"""Backend fod: the empty-hash trick. Ask Nix itself and read the hash from its error.

  file     import <nix/fetchurl.nix> { url; sha256 = ""; }      built with nix-build
  archive  builtins.fetchTarball { url; sha256 = ""; }           evaluated (its unpacker)
  git      (builtins.fetchGit { url; rev; submodules; }).narHash  evaluated
The mismatch message is parsed by pylmserv.nixmsg (every Nix / Lix format). For a file
the derivation is then built again with the hash found, which proves it and gives the size.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import List

from ...core.errors import HashError, NetworkError, ToolMissingError, UsageError
from ...core.hashing import Hash
from ...core.proc import run_tool
from ..nixmsg import got_hash
from .base import Fetch, Hashed
from .nix import store_name

TIMEOUT = 3600


def nix_str(text: str) -> str:
    """A Nix string literal (no interpolation)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def _run(args: List[str]) -> subprocess.CompletedProcess:
    return run_tool(args, timeout=TIMEOUT, timeout_error=NetworkError, missing_hint="Install Nix, or use --via python.")


def _mismatch(proc: subprocess.CompletedProcess, what: str) -> Hash:
    try:
        return got_hash(proc.stderr)
    except HashError:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("error")]
        last = lines[-1] if lines else f"exit {proc.returncode}"
        if "unexpected number of top-level files" in proc.stderr:
            raise UsageError(f"{what}: the archive has several top-level entries; builtins.fetchTarball refuses it",
                             hint="Use --via python or --via nix (nix-prefetch-url --unpack keeps them all).") from None
        raise NetworkError(f"{what}: Nix failed without a hash mismatch: {last}",
                           hint="Check the URL; run with -v to see Nix's output.") from None


def hash_fetch(fetch: Fetch, work: Path) -> Hashed:
    if fetch.headers:
        raise ToolMissingError("the fod backend cannot send the authentication this download needs",
                               hint="Use --via python for gated / private files.")
    if fetch.kind == "git":
        expr = (f"(builtins.fetchGit {{ url = {nix_str(fetch.url)}; rev = {nix_str(fetch.rev or '')}; "
                f"submodules = {'true' if fetch.submodules else 'false'}; allRefs = true; }}).narHash")
        proc = _run(["nix-instantiate", "--eval", "--json", "--expr", expr])
        if proc.returncode != 0:
            raise NetworkError(f"{fetch.name}: builtins.fetchGit failed: {proc.stderr.strip().splitlines()[-1:]}",
                               hint="Check the git URL and rev.")
        return Hashed(Hash.parse(proc.stdout.strip().strip('"')), fetcher="builtins.fetchGit")
    if fetch.kind == "archive":
        expr = f"builtins.fetchTarball {{ url = {nix_str(fetch.url)}; sha256 = \"\"; }}"
        proc = _run(["nix-instantiate", "--eval", "--option", "tarball-ttl", "0", "--expr", expr])
        return Hashed(_mismatch(proc, fetch.name))
    return _hash_file(fetch, work)


def _hash_file(fetch: Fetch, work: Path) -> Hashed:
    def expr(h: str) -> str:
        return (f"import <nix/fetchurl.nix> {{ url = {nix_str(fetch.url)}; sha256 = {nix_str(h)}; "
                f"name = {nix_str(store_name(fetch.url))}; }}")

    proc = _run(["nix-build", "--no-out-link", "--expr", expr("")])
    found = _mismatch(proc, fetch.name)
    again = _run(["nix-build", "--no-out-link", "--expr", expr(found.sri)])
    if again.returncode != 0:
        raise NetworkError(f"{fetch.name}: Nix rejected its own hash {found.sri} on a second build",
                           hint="The file changes between downloads; pin a stable URL.")
    out = again.stdout.strip().splitlines()[-1]
    return Hashed(found, os.path.getsize(out) if os.path.isfile(out) else None)
