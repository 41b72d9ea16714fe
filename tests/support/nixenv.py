"""Real Nix (Debian nix-bin) as root, offline, without a daemon."""
from __future__ import annotations

import os
import shutil

NIX_CONFIG = "\n".join([
    "experimental-features = nix-command flakes",
    "build-users-group =",
    "substituters =",
    "sandbox = false",
    "warn-dirty = false",
])


def have_nix() -> bool:
    return shutil.which("nix") is not None and shutil.which("nix-build") is not None


def nix_env() -> dict:
    return {"NIX_CONFIG": NIX_CONFIG, "NIX_REMOTE": "", "HOME": os.environ.get("HOME", "/root")}
