"""ed25519 keys and signatures in Nix's format, so one key signs a Nix binary cache and a
pylmserv build cache.

Nix's text forms (libstore/crypto.cc), all `NAME:BASE64`:
  secret key   NAME:base64(64 bytes: the 32-byte seed, then the 32-byte public key)
               (`nix key generate-secret --key-name NAME`)
  public key   NAME:base64(32 bytes)   (`nix key convert-secret-to-public`)
  signature    NAME:base64(64 bytes)   (a narinfo's `Sig:` line)
A signature is valid for a public key of the same NAME whose ed25519 check of the message
passes. Nix signs a store path's fingerprint, `1;PATH;NARHASH;NARSIZE;REF,REF,...`
(`narinfo_fingerprint`); pylmserv signs its build manifests' fingerprint the same way.

Uses `cryptography` (imported lazily: only key and cache commands need it).
"""
from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, List, Sequence, Tuple

from .errors import UsageError, VerificationError

SEED_BYTES, PUBLIC_BYTES, SIGNATURE_BYTES = 32, 32, 64


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a dependency of pylmserv
        raise UsageError("signing needs the `cryptography` package", hint="pip install cryptography") from None
    return ed25519


def _split(text: str, what: str, size: int) -> Tuple[str, bytes]:
    """NAME:BASE64 -> (name, bytes); the error never quotes a secret key's text."""
    text = text.strip()
    name, sep, b64 = text.partition(":")
    if not sep or not name or not b64:
        raise UsageError(f"not a {what} in Nix's NAME:BASE64 format",
                         hint="Keys look like `cache.example.org-1:BASE64` (`pylmserv key generate NAME`).")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what} {name!r}: the part after ':' is not base64") from None
    if len(raw) != size:
        raise UsageError(f"{what} {name!r}: {len(raw)} bytes after base64 decoding, expected {size}")
    return name, raw


def _text(name: str, raw: bytes) -> str:
    """(name, bytes) -> Nix's NAME:BASE64."""
    return f"{name}:{base64.b64encode(raw).decode()}"


@dataclass(frozen=True)
class _Named:
    """A public key or a signature: NAME and bytes of a fixed size, NAME:BASE64 as text."""

    name: str
    raw: bytes
    WHAT: ClassVar[str] = ""
    SIZE: ClassVar[int] = 0

    @classmethod
    def parse(cls, text: str):
        return cls(*_split(text, cls.WHAT, cls.SIZE))

    def __str__(self) -> str:
        return _text(self.name, self.raw)


class PublicKey(_Named):
    WHAT, SIZE = "public key", PUBLIC_BYTES  # raw: 32 bytes

    def verify(self, signature: "Signature", message: bytes) -> bool:
        if signature.name != self.name:
            return False
        from cryptography.exceptions import InvalidSignature

        try:
            _ed25519().Ed25519PublicKey.from_public_bytes(self.raw).verify(signature.raw, message)
        except InvalidSignature:
            return False
        return True


class Signature(_Named):
    WHAT, SIZE = "signature", SIGNATURE_BYTES  # raw: 64 bytes


@dataclass(frozen=True)
class SecretKey:
    name: str
    raw: bytes = b""  # 64 bytes: seed + public

    def __repr__(self) -> str:  # never the secret
        return f"SecretKey(name={self.name!r})"

    @classmethod
    def parse(cls, text: str) -> "SecretKey":
        name, raw = _split(text, "secret key", SEED_BYTES + PUBLIC_BYTES)
        key = cls(name, raw)
        if key._private().public_key().public_bytes_raw() != raw[SEED_BYTES:]:
            raise UsageError(f"secret key {name!r}: its last 32 bytes are not the public key of its seed",
                             hint="The file is damaged; make a new key (`pylmserv key generate NAME`).")
        return key

    @classmethod
    def read(cls, path: Path) -> "SecretKey":
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the secret key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            return cls.parse(text)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc.message}", hint=exc.hint) from None

    @classmethod
    def generate(cls, name: str) -> "SecretKey":
        if not name or ":" in name or any(c.isspace() for c in name):
            raise UsageError(f"key name {name!r}: must be non-empty, without ':' or spaces",
                             hint="Nix's convention: the cache's host name and a number, e.g. cache.example.org-1.")
        seed = os.urandom(SEED_BYTES)
        public = _ed25519().Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        return cls(name, seed + public)

    def _private(self):
        return _ed25519().Ed25519PrivateKey.from_private_bytes(self.raw[:SEED_BYTES])

    def to_text(self) -> str:
        """The secret key file's content (no newline, as Nix writes it)."""
        return _text(self.name, self.raw)

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.name, self.raw[SEED_BYTES:])

    def sign(self, message: bytes) -> Signature:
        return Signature(self.name, self._private().sign(message))


def narinfo_fingerprint(store_path: str, nar_hash: str, nar_size: int, references: Sequence[str]) -> bytes:
    """What Nix signs for a store path (ValidPathInfo::fingerprint): NARHASH in the
    `sha256:NIX32` form, references as full store paths, sorted, comma-separated."""
    if not nar_hash.startswith("sha256:"):
        raise UsageError(f"narinfo fingerprint: NAR hash {nar_hash!r} must be sha256:NIX32")
    return f"1;{store_path};{nar_hash};{nar_size};{','.join(sorted(references))}".encode()


def parse_public_keys(texts: Iterable[str]) -> List[PublicKey]:
    """Public keys from config/env (whitespace-separated entries allowed)."""
    out = []
    for text in texts:
        for word in str(text).split():
            out.append(PublicKey.parse(word))
    return out


def check_signatures(signatures: Iterable[str], trusted: Sequence[PublicKey], message: bytes) -> PublicKey:
    """The trusted key that signed `message`; else VerificationError saying which way it failed:
    no signature, signed only by untrusted key names, or a bad signature by a trusted name."""
    names, bad = [], []
    by_name = {}
    for k in trusted:
        by_name.setdefault(k.name, []).append(k)
    for text in signatures:
        try:
            sig = Signature.parse(text)
        except UsageError:
            bad.append("(malformed signature)")
            continue
        names.append(sig.name)
        for key in by_name.get(sig.name, ()):
            if key.verify(sig, message):
                return key
        if sig.name in by_name:
            bad.append(sig.name)
    if bad:
        raise VerificationError(f"bad signature by {', '.join(sorted(set(bad)))}: it does not verify "
                                "(the signed content was changed, or the key of that name is another)")
    if names:
        raise VerificationError(f"signed by untrusted key {', '.join(sorted(set(names)))} "
                                f"(trusted: {', '.join(sorted(by_name)) or 'none'})")
    raise VerificationError("not signed")

