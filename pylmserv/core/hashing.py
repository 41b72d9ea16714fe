"""One Hash value type: parse any encoding Nix accepts, render sri | nix32 | hex | base64."""
from __future__ import annotations

import base64
import binascii
import hashlib

from .errors import HashError
from .record import Record

_set = object.__setattr__

SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}
NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_NIX32_INDEX = {c: i for i, c in enumerate(NIX32_ALPHABET)}
FORMATS = ("sri", "nix32", "hex", "base64")


def nix32_len(size: int) -> int:
    return (size * 8 - 1) // 5 + 1


def nix32_encode(digest: bytes) -> str:
    """Nix's base32: its own alphabet, least significant bits first, printed reversed."""
    n_chars = nix32_len(len(digest))
    value = int.from_bytes(digest, "little")
    return "".join(NIX32_ALPHABET[(value >> (5 * n)) & 0x1F] for n in range(n_chars - 1, -1, -1))


def nix32_decode(text: str, size: int) -> bytes:
    if len(text) != nix32_len(size):
        raise ValueError("wrong length")
    value = 0
    for n, ch in enumerate(reversed(text)):
        if ch not in _NIX32_INDEX:
            raise ValueError(f"invalid nix32 character {ch!r}")
        value |= _NIX32_INDEX[ch] << (5 * n)
    if value >> (size * 8):
        raise ValueError("nix32 value has bits past the hash size")
    return value.to_bytes(size, "little")


class Hash(Record):
    """An algorithm and a digest; immutable, compared and hashed by value (a Record)."""

    __slots__ = ("algo", "digest")
    algo: str
    digest: bytes

    def __init__(self, algo: str, digest: bytes):  # not Record's: positional, checked, often made
        _set(self, "algo", algo)
        _set(self, "digest", digest)
        self._check()

    def __hash__(self):
        return hash((self.algo, self.digest))

    def _check(self) -> None:
        if self.algo not in SIZES:
            raise HashError(f"unsupported hash type {self.algo!r}", hint="Use one of: " + ", ".join(SIZES))
        if len(self.digest) != SIZES[self.algo]:
            raise HashError(f"{self.algo} digest must be {SIZES[self.algo]} bytes, got {len(self.digest)}")

    # -- construction -------------------------------------------------------
    @classmethod
    def of_bytes(cls, data: bytes, algo: str = "sha256") -> "Hash":
        return cls(algo, hashlib.new(algo, data).digest())

    @classmethod
    def from_hashlib(cls, h) -> "Hash":
        return cls(h.name, h.digest())

    @classmethod
    def parse(cls, text: str, algo: str | None = None) -> "Hash":
        """Parse SRI (`sha256-<b64>`), `sha256:<any>`, or a bare hex/nix32/base64 digest.

        A bare digest needs `algo` unless its length names one (hex and nix32 lengths
        are unique across md5/sha1/sha256/sha512)."""
        original = text
        text = text.strip()
        if not text:
            raise HashError("empty hash string", hint="Give a hash such as sha256-<base64>= or 64 hex digits.")
        try:
            for name in SIZES:
                if text.startswith(name + "-"):
                    return cls(name, _b64decode(text[len(name) + 1:], SIZES[name]))
                if text.startswith(name + ":"):
                    return cls._bare(text[len(name) + 1:], name)
            if algo is not None:
                return cls._bare(text, algo)
            for name, size in SIZES.items():
                if len(text) in (size * 2, nix32_len(size)):
                    return cls._bare(text, name)
            for name, size in SIZES.items():
                if len(text) == len(base64.b64encode(bytes(size))):
                    return cls._bare(text, name)
        except (ValueError, binascii.Error) as exc:
            raise HashError(f"cannot parse hash {original!r}: {exc}",
                            hint="Use SRI (sha256-...=), sha256:<nix32>, or 64 hex digits.") from None
        raise HashError(f"cannot parse hash {original!r}: unknown length {len(text)}",
                        hint="Use SRI (sha256-...=), sha256:<nix32>, or 64 hex digits.")

    @classmethod
    def _bare(cls, text: str, algo: str) -> "Hash":
        if algo not in SIZES:
            raise ValueError(f"unsupported hash type {algo!r}")
        size = SIZES[algo]
        if len(text) == size * 2:
            return cls(algo, bytes.fromhex(text))
        if len(text) == nix32_len(size):
            return cls(algo, nix32_decode(text, size))
        return cls(algo, _b64decode(text, size))

    # -- rendering ----------------------------------------------------------
    @property
    def hex(self) -> str:
        return self.digest.hex()

    @property
    def nix32(self) -> str:
        return nix32_encode(self.digest)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.digest).decode()

    @property
    def sri(self) -> str:
        return f"{self.algo}-{self.base64}"

    def format(self, fmt: str = "sri") -> str:
        if fmt == "sri":
            return self.sri
        if fmt == "nix32":
            return self.nix32
        if fmt == "hex":
            return self.hex
        if fmt == "base64":
            return self.base64
        raise HashError(f"unknown hash format {fmt!r}", hint="Use one of: " + ", ".join(FORMATS))

    def __str__(self) -> str:
        return self.sri


def _b64decode(text: str, size: int) -> bytes:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != size:
        raise ValueError(f"base64 digest has {len(raw)} bytes, expected {size}")
    return raw


EMPTY_SHA256 = Hash.of_bytes(b"")


def file_hash(path, algo: str = "sha256", chunk: int = 1 << 20) -> Hash:
    """Flat hash of a file, streamed (what `nix hash file` and fetchurl use)."""
    h = hashlib.new(algo)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return Hash.from_hashlib(h)
