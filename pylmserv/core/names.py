"""One rule for names of sources and models, and one way to show untrusted text.

A name becomes a flake attribute (`nix build .#model-NAME`: a dot would split the
attribute path), a store directory and a CLI argument, so every command and the flake
accept the same set: ASCII letters, digits, `_` and `-`, not starting with `-`, at most
MAX_NAME characters. Checked once, when the config (or lock) is loaded.
"""
from __future__ import annotations

import re

from .errors import ConfigError

MAX_NAME = 100
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def check_name(name, where: str) -> str:
    """`name` if it follows the rule, else ConfigError naming what is wrong."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: empty name", hint="Name it with letters, digits, '_' and '-'.")
    shown = show(name if len(name) <= 60 else name[:60] + "...")
    if len(name) > MAX_NAME:
        why = f"is {len(name)} characters long (at most {MAX_NAME})"
    elif "." in name:
        why = "contains a dot (`nix build .#model-NAME` would split it)"
    elif not _NAME.match(name):
        why = "may only use ASCII letters, digits, '_' and '-', and not start with '-'"
    else:
        return name
    raise ConfigError(f"{where}: name {shown} {why}",
                      hint="Rename it (e.g. qwen2.5-0.5b -> qwen2_5-0_5b): the same rule holds for every "
                           "command and for the flake.")


_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}\Z")


def check_version(value, where: str) -> str:
    """A `version` / `cosmocc` value: it becomes part of a derivation's name in the flake,
    so the flake's rule (nix/sources.nix: validVersion) holds here too."""
    if not isinstance(value, str) or not _VERSION.match(value):
        raise ConfigError(f"{where}: version {show(repr(value))} must be letters, digits and . _ + - "
                          "(starting with a letter or digit, at most 100 characters)",
                          hint="e.g. version = \"3.3.6\".")
    return value


def show(text: str, lines: bool = False) -> str:
    """`text` safe for a terminal: control characters (ESC, BEL, C1, bidi overrides)
    escaped; with lines=True, newlines and tabs are kept (log lines, multi-line errors)."""
    def esc(m):
        c = m.group()
        if lines and c in "\n\t":
            return c
        return c.encode("unicode_escape").decode("ascii") if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return _CONTROL.sub(esc, str(text))


def pin_name(text: str) -> str:
    """A name that follows the rule, made from a file name (e.g. for a trust-on-first-use
    pin of a plain URL): every other character becomes `_`, as in the packaged catalog
    (qwen2.5-0.5b -> qwen2_5-0_5b)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", text).lstrip("-")[:MAX_NAME]
    return name or "model"
