"""Stand-in based: the pytest argv `nix flake check` would run, expanded from the check's
attributes the way nixpkgs' pytestCheckHook does it (tests/nixpkgs-standin/
pytest-check-hook.sh, a line-for-line stand-in of nixpkgs' pkgs/development/interpreters/
python/hooks/pytest-check-hook.sh of the 25.11 era, with stdenv's concatTo and
concatStringsSep in setup-lib.sh).

The flake once set `pytestFlagsArray = [ "-m" "not slow and not nix" ]`: the hook
`eval`s that attribute, and without __structuredAttrs a list reaches the builder as one
space-joined string, so pytest got `-m not slow and not nix` as six words and the check
failed. test_the_old_attribute_is_caught shows this test catches exactly that."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_flake_standin_eval import nix_module, repo_flake, standin_eval  # noqa: F401 (fixtures)

STANDIN = Path(__file__).resolve().parent / "nixpkgs-standin"
HOOK_ATTRS = ("pytestFlags", "pytestFlagsArray", "disabledTestMarks", "enabledTestMarks", "disabledTests",
              "enabledTests", "disabledTestPaths", "enabledTestPaths", "__structuredAttrs")
# What the offline check must run: pytest with the slow and nix tests deselected, one -m
# expression as one argument.
WANTED = ["-m", "pytest", "-m", "not (slow) and not (nix)"]


def env_value(value) -> str:
    """A derivation attribute as the builder sees it without __structuredAttrs (Nix's
    rules: lists joined by spaces, true -> "1", false/null -> "")."""
    if isinstance(value, list):
        return " ".join(env_value(v) for v in value)
    if value is True:
        return "1"
    if value in (False, None):
        return ""
    return str(value)


def pytest_argv(attrs: dict, tmp_path: Path) -> list:
    """The argv nixpkgs' pytestCheckHook would give pytest for a derivation with `attrs`."""
    recorder = tmp_path / "python3"
    out = tmp_path / "argv"
    recorder.write_text(f"#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done > '{out}'\n")
    recorder.chmod(0o755)
    structured = bool(attrs.get("__structuredAttrs"))
    lines = []
    env = {"PATH": os.environ["PATH"], "pythonCheckInterpreter": str(recorder)}
    for name in HOOK_ATTRS:
        if name not in attrs or name == "__structuredAttrs":
            continue
        if structured and isinstance(attrs[name], list):  # structured attrs: real bash arrays
            items = " ".join("'" + str(v).replace("'", "'\\''") + "'" for v in attrs[name])
            lines.append(f"declare -a {name}=({items})")
        else:
            env[name] = env_value(attrs[name])
    script = "\n".join([
        # phases run under `set -e` but not `set -u` (stdenv restores nounset after its setup;
        # the hook reads unset variables, e.g. includeString when only marks are excluded)
        "set -e -o pipefail",
        "runHook() { :; }",
        f"source '{STANDIN / 'setup-lib.sh'}'",
        f"source '{STANDIN / 'pytest-check-hook.sh'}'",
        *lines,
        "pytestCheckPhase",
    ])
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes().decode().split("\0")[:-1]


@pytest.mark.nix
def test_the_flake_check_runs_pytest_with_one_mark_expression(repo_flake, tmp_path):  # noqa: F811
    attrs = standin_eval(repo_flake, "checks.x86_64-linux.pylmserv-tests",
                         "d: builtins.intersectAttrs (builtins.listToAttrs (map (n: { name = n; value = null; }) "
                         f"[ {' '.join(chr(34) + a + chr(34) for a in HOOK_ATTRS)} ])) d.drvAttrs")
    assert "pytestFlagsArray" not in attrs  # obsolete in nixpkgs, and `eval`ed: never again
    assert pytest_argv(attrs, tmp_path) == WANTED


def test_the_old_attribute_is_caught(tmp_path):
    """What the flake had: six words reach pytest, which then looks for files named
    `slow`, `and`, ... (the expansion above would have failed on it)."""
    argv = pytest_argv({"pytestFlagsArray": ["-m", "not slow and not nix"]}, tmp_path)
    assert argv == ["-m", "pytest", "-m", "not", "slow", "and", "not", "nix"]
    assert argv != WANTED


@pytest.mark.parametrize("attrs,argv", [
    # pytestFlags without structured attrs: split on whitespace too (concatTo)
    ({"pytestFlags": ["-m", "not slow"]}, ["-m", "not", "slow"]),
    ({"pytestFlags": ["-m", "not slow"], "__structuredAttrs": True}, ["-m", "not slow"]),
    ({"disabledTestMarks": ["slow", "nix"]}, ["-m", "not (slow) and not (nix)"]),
    ({"enabledTestMarks": ["a"], "disabledTestMarks": ["b"]}, ["-m", "((a)) and not (b)"]),
    ({"disabledTests": ["test_x", "test_y"]}, ["-k", "not (test_x) and not (test_y)"]),
    ({"disabledTestPaths": ["tests/a.py::test_b"]}, ["--deselect=tests/a.py::test_b"]),
    ({"pytestFlags": ["-x"], "disabledTestMarks": ["slow"]}, ["-m", "not (slow)", "-x"]),
])
def test_the_hook_expands_like_nixpkgs(tmp_path, attrs, argv):
    assert pytest_argv(attrs, tmp_path) == ["-m", "pytest", *argv]
