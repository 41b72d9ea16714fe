"""BLAS on the CPU: which vendor upstream would use (Accelerate on macOS, OpenBLAS where
its headers are); the preflight and the CMake switches for it."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from ..probe import Runner, default_run
from . import Switches

NAME = "blas"

BLAS_HEADERS = tuple(Path(d, "cblas.h") for d in (
    "/usr/include/openblas", "/usr/include/x86_64-linux-gnu/openblas-pthread",
    "/usr/include/aarch64-linux-gnu/openblas-pthread", "/usr/local/include/openblas", "/usr/include"))


def detect_blas(platform: str = sys.platform) -> Optional[str]:
    """The BLAS vendor upstream would use: Apple (Accelerate) on macOS, OpenBLAS when its headers exist."""
    if platform == "darwin":
        return "Apple"
    return "OpenBLAS" if any(p.exists() for p in BLAS_HEADERS) else None


def detect(env=None, run: Runner = default_run, platform: str = sys.platform) -> dict:
    return {"blas_vendor": detect_blas(platform)}


def toolkit_found(extra: dict) -> bool:
    return bool(extra.get("blas_vendor"))


def preflight(extra: dict, nix: str) -> List[str]:
    if not toolkit_found(extra):
        return ["a BLAS library (apt-get install libopenblas-dev; macOS uses Accelerate)"]
    return []


SWITCHES = (("{P}_BLAS", "ON"),)


def options(sw: Switches, req, det) -> None:
    sw.table(SWITCHES)
    sw.put(f"{sw.prefix}_BLAS_VENDOR", det.blas_vendor or ("Apple" if det.platform == "darwin" else "OpenBLAS"))
