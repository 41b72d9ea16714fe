"""docs/nix.md: every `nix` command it shows uses only flags this Nix (2.8) accepts.

The oracle is Nix itself: a flag is accepted when `nix <command> --help` or `nix --help`
lists it, or when it names a Nix setting (`nix show-config`; any setting is a flag).
Also: the one lock the flake reads is the one the package ships.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from functools import lru_cache

import pytest

from tests.support import flakeworld as fw

DOC = fw.REPO / "docs" / "nix.md"
SUBCOMMANDS = {"build", "run", "develop", "copy", "eval", "profile", "flake", "store", "key", "hash", "path-info"}


def nix_commands(text: str):
    """Every `nix ...` command line in fenced code blocks and inline code."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("nix "):
                commands.append(line)
    for inline in re.findall(r"`(nix [^`]+)`", text):
        commands.append(inline)
    return [c for c in commands if "<" not in c]  # `nix <command> --help`: prose, not a command


@lru_cache(maxsize=None)
def _help(*words: str) -> str:
    proc = subprocess.run(["nix", *words, "--help"], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PAGER": "cat", "MANPAGER": "cat"})
    return proc.stdout + proc.stderr


@lru_cache(maxsize=None)
def _settings() -> frozenset:
    out = subprocess.run(["nix", "show-config"], capture_output=True, text=True, timeout=60).stdout
    return frozenset(line.split(" = ", 1)[0] for line in out.splitlines() if " = " in line)


def rejected_flags(command: str):
    words = shlex.split(command)[1:]
    sub = [w for w in words[:2] if not w.startswith("-") and re.fullmatch(r"[a-z-]+", w)]
    if not sub or sub[0] not in SUBCOMMANDS:
        return [f"unknown subcommand in {command!r}"]
    if sub[0] in ("flake", "store", "key", "profile") and len(sub) < 2:
        return [f"incomplete subcommand in {command!r}"]
    path = tuple(sub[:2] if sub[0] in ("flake", "store", "key", "profile") else sub[:1])
    text = _help(*path) + _help()
    if "--" in words:
        words = words[:words.index("--")]  # what follows goes to the program
    bad = []
    for w in words:
        if not w.startswith("--"):
            continue
        flag = w.split("=", 1)[0]
        name = flag[2:]
        setting = name[len("extra-"):] if name.startswith("extra-") else name
        if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) or setting in _settings():
            continue
        bad.append(flag)
    return bad


@pytest.mark.nix
def test_every_nix_command_in_the_docs_is_accepted_by_this_nix(nix):
    text = DOC.read_text()
    commands = nix_commands(text)
    assert len(commands) >= 10, commands
    problems = {c: rejected_flags(c) for c in commands}
    assert {c: p for c, p in problems.items() if p} == {}


@pytest.mark.nix
def test_a_flag_nix_2_8_lacks_is_caught(nix):
    assert rejected_flags("nix build --no-link --print-out-paths .#model-x") == ["--print-out-paths"]
    assert rejected_flags("nix build --no-link --json .#model-x") == []


def test_the_flake_and_the_package_read_one_lock():
    """pylmserv.lock (read by flake.nix) and pylmserv/data/pylmserv.lock (shipped in the
    package) must not drift apart."""
    assert (fw.REPO / "pylmserv.lock").read_bytes() == (fw.REPO / "pylmserv" / "data" / "pylmserv.lock").read_bytes()
