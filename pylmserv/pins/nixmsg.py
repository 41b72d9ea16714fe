"""Parse Nix hash-mismatch messages (every known Nix and Lix format) into Hash values.

Formats, oldest first (a corpus of real outputs lives in tests/data/nixmsg/):
  Nix 1.x      output path 'P' should have sha256 hash 'WANT', instead has 'GOT'
               Nix expects output path 'P' to have sha256 hash 'WANT', instead it has 'GOT'
               output path 'P' has [r:]sha256 hash 'GOT' when 'WANT' was expected
  Nix 2.0-2.1  fixed-output derivation produced path 'P' with sha256 hash 'GOT'
               instead of the expected hash 'WANT'
  Nix 2.2-2.3  hash mismatch in fixed-output derivation 'P':
                 wanted: sha256:<nix32>
                 got:    sha256:<nix32>
  Nix 2.4+     ... specified: sha256-<b64>  / got: sha256-<b64>   (SRI; eval-time fetchers
               print `sha256:<nix32>` under "hash mismatch in file downloaded from 'URL'")
  Lix 2.91+    adds `likely URL:` before and `expected path:` / `got path:` after.
  fetchTree / fetchGit / flake inputs (eval time, a `narHash` that does not match):
  Nix 2.4+     NAR hash mismatch in input 'INPUT' (STOREPATH), expected 'WANT', got 'GOT'
               (NixOS/nix PR #3653; real Nix 2.8 here, still in reports from 2024)
  newer Nix    NAR hash mismatch in input 'INPUT', expected 'WANT' but got 'GOT'  (2025 reports)
               (some source revisions pass these two the other way round; when INPUT carries
               `narHash=`, that one is the wanted hash whatever the label says)
Quotes may be ASCII or typographic, lines may be wrapped, colours (ANSI) are ignored,
and one output may hold several mismatches.
"""
from __future__ import annotations

import re
from urllib.parse import unquote
from dataclasses import dataclass
from typing import List, Optional

from ..core.errors import HashError
from ..core.hashing import Hash

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_Q = r"['\u2018\u2019`]"  # opening/closing quote: ASCII or typographic
_NQ = r"[^'\u2018\u2019`]"
_H = r"[A-Za-z0-9+/=:_-]+"
_ALGO = r"(?:r:)?(?P<algo>md5|sha1|sha256|sha512)"

_ONE_LINE = [
    # got first, then wanted
    re.compile(rf"output path\s+{_Q}(?P<path>{_NQ}*){_Q}\s+has\s+{_ALGO}\s+hash\s+{_Q}(?P<got>{_H}){_Q}\s+when\s+"
               rf"{_Q}(?P<wanted>{_NQ}*){_Q}\s+was\s+expected"),
    re.compile(rf"fixed-output derivation produced path\s+{_Q}(?P<path>{_NQ}*){_Q}\s+with\s+{_ALGO}\s+hash\s+"
               rf"{_Q}(?P<got>{_H}){_Q}\s+instead\s+of\s+the\s+expected\s+hash\s+{_Q}(?P<wanted>{_NQ}*){_Q}"),
    # wanted first, then got
    re.compile(rf"output path\s+{_Q}(?P<path>{_NQ}*){_Q}\s+should\s+have\s+{_ALGO}\s+hash\s+{_Q}(?P<wanted>{_NQ}*){_Q},?"
               rf"\s+instead\s+has\s+{_Q}(?P<got>{_H}){_Q}"),
    re.compile(rf"expects\s+output\s+path\s+{_Q}(?P<path>{_NQ}*){_Q}\s+to\s+have\s+{_ALGO}\s+hash\s+"
               rf"{_Q}(?P<wanted>{_NQ}*){_Q},?\s+instead\s+it\s+has\s+{_Q}(?P<got>{_H}){_Q}"),
]

# Eval-time fetchers (fetchTree, fetchGit, flake inputs); SRI hashes, one (possibly wrapped) line.
_INPUT = re.compile(
    # INPUT is greedy within its line: a URL may itself hold quotes and a fake trailer,
    # Nix's own `expected ..., got ...` is the last one on the line.
    rf"NAR hash mismatch in input\s+{_Q}(?P<input>[^\n]*){_Q}(?:\s*\((?P<path>[^)\s]*)\))?,?"
    rf"\s+expected\s+{_Q}(?P<wanted>{_H}){_Q},?\s+(?:but\s+)?got\s+{_Q}(?P<got>{_H}){_Q}")
_NARHASH_PARAM = re.compile(r"[?&]narHash=([^&\s]+)")

# Block formats, read as a stream of labelled tokens in order of appearance.
_TOKENS = re.compile(
    rf"hash mismatch in (?:fixed-output derivation|file downloaded from)\s+{_Q}(?P<header>{_NQ}*){_Q}"
    rf"|likely URL:[ \t]*(?P<url>\S+)"
    rf"|(?:wanted|specified):[ \t]*(?P<wanted>{_H})?"
    rf"|expected path:[ \t]*(?P<exp_path>\S+)"
    rf"|got path:[ \t]*(?P<got_path>\S+)"
    rf"|(?<![\w-])got:[ \t]*(?P<got>{_H})"
)


@dataclass(frozen=True)
class Mismatch:
    """One hash mismatch: what Nix got (always), what it wanted (when parseable)."""

    got: Hash
    wanted: Optional[Hash] = None
    where: Optional[str] = None  # the .drv, output path or URL named in the header
    url: Optional[str] = None  # Lix `likely URL:` or the URL of an eval-time download
    got_path: Optional[str] = None  # Lix `got path:`


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _hash(text: Optional[str], algo: Optional[str] = None) -> Optional[Hash]:
    if not text:
        return None
    try:
        return Hash.parse(text, algo=None if (":" in text or "-" in text) else algo)
    except HashError:
        return None


def parse(output: str) -> List[Mismatch]:
    """Every hash mismatch in `output`, in order; [] when there is none."""
    text = strip_ansi(output).replace("\r", "")
    found = []  # (position, Mismatch)
    for rx in _ONE_LINE:
        for m in rx.finditer(text):
            algo = m.group("algo")
            got = _hash(m.group("got"), algo)
            if got is not None:
                found.append((m.start(), Mismatch(got, _hash(m.group("wanted"), algo), where=m.group("path"))))
    found.extend(_parse_inputs(text))
    found.extend(_parse_blocks(text))
    found.sort(key=lambda pair: pair[0])
    return [mm for _, mm in found]


def _parse_inputs(text: str) -> list:
    out = []
    for m in _INPUT.finditer(text):
        got, wanted, where = _hash(m.group("got")), _hash(m.group("wanted")), m.group("input")
        if got is None:
            continue
        param = _NARHASH_PARAM.search(where)
        pinned = _hash(unquote(param.group(1))) if param else None
        if pinned is not None and pinned == got and wanted is not None and wanted != got:
            got, wanted = wanted, got  # labels swapped; the input's own narHash is the wanted one
        out.append((m.start(), Mismatch(got, wanted, where=where, url=where.split("?", 1)[0])))
    return out


def _parse_blocks(text: str) -> list:
    out = []
    header = url = wanted_text = None
    start = None
    for m in _TOKENS.finditer(text):
        # Only the `wanted:` alternative can match with no group (its hash is optional,
        # e.g. `specified: (empty)`), so no group means an unparseable wanted value.
        kind = m.lastgroup or "wanted"
        value = m.group(kind) if m.lastgroup else None
        if kind == "header":
            header, url, wanted_text, start = value, None, None, m.start()
            if value.startswith(("http://", "https://", "file://")):
                url = value
        elif kind == "url":
            url = value
        elif kind == "wanted":
            wanted_text = value or ""
            start = m.start() if start is None else start
        elif kind == "got":
            got = _hash(value)
            if got is not None:
                wanted = _hash(wanted_text, got.algo)
                out.append([start if start is not None else m.start(), Mismatch(got, wanted, where=header, url=url)])
            header = url = wanted_text = start = None
        elif kind == "got_path" and out:
            pos, last = out[-1]
            out[-1] = [pos, Mismatch(last.got, last.wanted, last.where, last.url, got_path=value)]
    return [tuple(pair) for pair in out]


def got_hash(output: str, url: Optional[str] = None) -> Hash:
    """The single `got` hash in a Nix error output; raises when there is none or several differ.
    With `url`, only mismatches about that URL count (a log may hold other inputs' mismatches)."""
    found = parse(output)
    if url is not None:
        found = [m for m in found if m.url == url]
    if not found:
        raise HashError("no hash mismatch found in Nix output",
                        hint="Run the nix command by hand to see what failed.")
    distinct = {m.got for m in found}
    if len(distinct) > 1:
        raise HashError(f"Nix reported {len(distinct)} different hash mismatches; expected one",
                        hint="Prefetch one entry at a time.")
    return found[0].got
