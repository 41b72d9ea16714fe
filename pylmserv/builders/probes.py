"""Stat-only detections that are part of a build's key (OpenSSL's headers).

Apart from builders/toolchain.py (which re-exports them) because an up-to-date build runs
them on every call and must not pay for the toolchain's and the backends' modules, their
tool probes and records (docs/build.md: the up-to-date budget). Standard library only;
no subprocess, no dataclass. BLAS headers (the blas backend's key) are in
builders/backends/blas.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List


def openssl_header_paths(env=None) -> List[Path]:
    """Where CMake finds OpenSSL's development headers by default (stat these, nothing else)."""
    env_ = env if env is not None else os.environ
    roots = [env_.get("OPENSSL_ROOT_DIR"), "/usr", "/usr/local", "/opt/homebrew/opt/openssl@3",
             "/usr/local/opt/openssl@3"]
    roots += [p.rstrip("/").rsplit("/lib/pkgconfig", 1)[0] for p in env_.get("PKG_CONFIG_PATH", "").split(":") if p]
    return [Path(r) / "include" / "openssl" / "ssl.h" for r in roots if r]


def detect_openssl_headers(env=None, platform: str = sys.platform) -> bool:
    """Cheap (stat only): are OpenSSL development headers where CMake looks by default?"""
    return any(p.exists() for p in openssl_header_paths(env))
