"""pylmserv: build llama.cpp / llamafile from pinned sources, fetch verified models.

The library API (the CLI is a thin layer over it). Names are imported lazily so
`import pylmserv` and `pylmserv --help` stay fast:

- ``prefetch(names=None, config=None, lock=None, via="auto", check=False, refresh=False)``
  -> PrefetchResult: resolve refs, compute Nix-exact hashes, write the lock.
- ``fetch(items, dest=None, connections=8, offline=False, ...)`` -> list[FetchResult]
- ``build(what="llama.cpp", backend="cpu", ...)`` -> BuildResult
- ``pack(model, llamafile, output, args=(), align=65536)`` -> PackResult
- ``hash_path(path, mode=None, algo="sha256")`` -> Hash (like `nix hash path|file`)
- ``Hash``: parse any hash encoding, render sri|nix32|hex|base64.
- ``load_project(config=None, lock=None)`` -> Project (config + lock).
"""
from __future__ import annotations

import importlib

from .core.version import __version__

_API = {
    "prefetch": "pylmserv.pins.prefetch",
    "fetch": "pylmserv.app.fetch_models",
    "download_models": "pylmserv.app.fetch_models",
    "build": "pylmserv.builders",
    "build_llama_cpp": "pylmserv.builders",
    "pack": "pylmserv.app.pack",
    "hash_path": "pylmserv.core.nar",
    "Hash": "pylmserv.core.hashing",
    "load_project": "pylmserv.pins.config",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pylmserv' has no attribute {name!r}")
