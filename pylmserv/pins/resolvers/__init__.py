"""Resolvers turn an intent (SourceSpec / ModelSpec) into a LockEntry.

One module per source type (github, git, url, hf) decides *what* to fetch (resolving
refs, reading the Hub API); one module per backend decides *how* to hash it:
  python  in-process (archive.extract + nar), the default
  nix     nix-prefetch-url [--unpack] / nix-prefetch-git, their output parsed
  fod     the empty-hash trick: a fixed-output derivation built by nix-build, the
          hash read back from Nix's mismatch message (pylmserv.nixmsg)
  auto    python, cross-checked with the nix tools when they are on PATH
"""
from __future__ import annotations

import logging

from ...core.errors import PylmservError
from . import fod, nix, python
from .base import BACKENDS, Fetch, Hashed, Options, same_pin  # noqa: F401 - the package's names

log = logging.getLogger("pylmserv.prefetch")


def hash_fetch(fetch: Fetch, opts: Options) -> Hashed:
    """Hash `fetch` with the chosen backend (auto: python, cross-checked by nix tools)."""
    if opts.via == "python":
        return python.hash_fetch(fetch, opts.work)
    if opts.via == "nix":
        return nix.hash_fetch(fetch, opts.work)
    if opts.via == "fod":
        return fod.hash_fetch(fetch, opts.work)
    result = python.hash_fetch(fetch, opts.work)
    if nix.available(fetch) and not fetch.headers:  # nix tools cannot send auth headers
        try:
            other = nix.hash_fetch(fetch, opts.work)
        except PylmservError as exc:
            # Python already fetched it, so this is the local Nix setup (daemon, store
            # permissions), not the source: keep the result, say the check was skipped.
            log.warning("%s: not cross-checked, %s failed: %s", fetch.name, nix.tool_for(fetch), exc.message)
            return result
        nix.cross_check(fetch, result, other)  # a disagreement is an error
    return result
