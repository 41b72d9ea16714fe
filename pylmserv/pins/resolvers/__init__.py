"""Resolvers turn an intent (SourceSpec / ModelSpec) into a LockEntry.

One module per source type (github, git, url, hf) decides *what* to fetch (resolving
refs, reading the Hub API); one module per backend decides *how* to hash it:
  python  in-process (archive.extract + nar), the default
  nix     nix-prefetch-url [--unpack] / nix-prefetch-git, their output parsed
  fod     the empty-hash trick: a fixed-output derivation built by nix-build, the
          hash read back from Nix's mismatch message (pylmserv.nixmsg)
  auto    python, cross-checked with the nix tools when they are on PATH: a pin Nix
          refuses (or hashes differently) is never written (exit 4). Only an explicit
          --via python skips the cross-check; a download that needs authentication
          (which the nix tools cannot send) is not cross-checked, and says so.
"""
from __future__ import annotations

from ...core.errors import PylmservError, ToolMissingError, VerificationError
from ...core.log import get_logger
from . import fod, nix, python
from .base import BACKENDS, Fetch, Hashed, Options  # noqa: F401 - the package's names

log = get_logger("pylmserv.prefetch")


def hash_fetch(fetch: Fetch, opts: Options) -> Hashed:
    """Hash `fetch` with the chosen backend (auto: python, cross-checked by nix tools)."""
    if opts.via == "python":
        return python.hash_fetch(fetch, opts.work)
    if opts.via == "nix":
        return nix.hash_fetch(fetch, opts.work)
    if opts.via == "fod":
        return fod.hash_fetch(fetch, opts.work)
    result = python.hash_fetch(fetch, opts.work)
    tool = nix.tool_for(fetch)
    if fetch.headers:
        log.info("%s: not cross-checked: %s cannot send the authentication this download needs",
                 fetch.name, tool)
        return result
    if fetch.kind == "git" and not fetch.submodules:
        # nix-prefetch-git hashes fetchgit's tree (export-ignore files kept); the pin is for
        # builtins.fetchGit's (Nix 2.8 exports the commit, dropping them): not comparable.
        log.info("%s: not cross-checked: %s hashes a different tree than builtins.fetchGit", fetch.name, tool)
        return result
    if not nix.available(fetch):
        log.info("%s: not cross-checked: %s is not on PATH", fetch.name, tool)
        return result
    try:
        other = nix.hash_fetch(fetch, opts.work)
    except ToolMissingError:
        log.info("%s: not cross-checked: %s is not usable here", fetch.name, tool)
        return result
    except PylmservError as exc:
        if nix.is_setup_error(exc.message):
            # The local Nix could not run (daemon, store permissions): it judged nothing.
            log.warning("%s: not cross-checked, %s failed: %s", fetch.name, tool, exc.message)
            return result
        # Nix refused what Python accepted: such a pin would not build with Nix.
        raise VerificationError(
            f"{fetch.name}: pylmserv computed {result.hash.sri}, but {tool} refused the same input: {exc.message}",
            hint="The pin is not written. Fix the source (or the local Nix setup) and retry; "
                 "`--via python` skips the cross-check, `--via nix` uses only Nix.") from None
    nix.cross_check(fetch, result, other)  # a disagreement is an error
    return result
