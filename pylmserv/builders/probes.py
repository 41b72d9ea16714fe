"""Stat-only detections that are part of a build's key (OpenSSL and BLAS headers).

Apart from builders/toolchain.py (which re-exports them) because an up-to-date build runs
them on every call and must not pay for the toolchain module's tool probes and records
(docs/build.md: an up-to-date `pylmserv build` within Python start + 100 ms). Standard
library only; no subprocess, no dataclass.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional


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


BLAS_HEADERS = tuple(Path(d, "cblas.h") for d in (
    "/usr/include/openblas", "/usr/include/x86_64-linux-gnu/openblas-pthread",
    "/usr/include/aarch64-linux-gnu/openblas-pthread", "/usr/local/include/openblas", "/usr/include"))


def detect_blas(platform: str = sys.platform) -> Optional[str]:
    """The BLAS vendor upstream would use: Apple (Accelerate) on macOS, OpenBLAS when its headers exist."""
    if platform == "darwin":
        return "Apple"
    return "OpenBLAS" if any(p.exists() for p in BLAS_HEADERS) else None
