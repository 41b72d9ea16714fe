"""A test whose tool or fixture is missing: under CI (CI set, as .ci/run's machine has)
that is a failure, because scripts/setup-dev.sh installs everything the README says the
test run covers; on a developer's machine it is a skip that names how to get it.

Only for what setup-dev.sh provides (Nix, binutils, patchelf, the Vulkan packages, ninja,
the [test] extra, the cached sources, ../shared/fixtures, cuBLAS where nvcc is). Conditions
that are not a missing tool (no root, no tmpfs, another OS, no nvcc: "whatever the machine
has") stay plain skips."""
from __future__ import annotations

import os

import pytest

WHY_CI = "CI runs every test the README claims: scripts/setup-dev.sh provides it"


def missing(what: str, how: str = "scripts/setup-dev.sh installs it") -> None:
    """Fail under CI, else skip: `what` is missing (`how`: how to get it)."""
    message = f"{what} missing ({how})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; {WHY_CI}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require(ok, what: str, how: str = "scripts/setup-dev.sh installs it") -> None:
    if not ok:
        missing(what, how)


def require_module(name: str, how: str = "the [test] extra installs it"):
    """importorskip that fails under CI."""
    try:
        return __import__(name)
    except ImportError:
        missing(f"Python module {name}", how)
