"""Keys and signatures in Nix's format, with real Nix (2.8) as the oracle: a key made by
Nix works with pylmserv and one made by pylmserv works with Nix; a pylmserv signature over a
store path's fingerprint verifies the way Nix verifies a binary cache's narinfo, and a
signature Nix made verifies in pylmserv."""
from __future__ import annotations

import base64
import json
import os
import stat
import subprocess

import pytest

from pylmserv.core.errors import UsageError, VerificationError
from pylmserv.core.hashing import Hash
from pylmserv.core.signing import (PublicKey, SecretKey, Signature, check_signatures, narinfo_fingerprint,
                                   parse_public_keys)
from tests.conftest import run_cli


def nixrun(*argv, input=None, check=True):
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv}: {proc.returncode}\n{proc.stderr}")
    return proc


@pytest.mark.nix
def test_nix_made_key_works_in_pylmserv(nix, tmp_path):
    secret = nixrun("nix", "key", "generate-secret", "--key-name", "team-cache-1").stdout
    public = nixrun("nix", "key", "convert-secret-to-public", input=secret).stdout.strip()
    key = SecretKey.parse(secret)
    assert str(key.public) == public
    (tmp_path / "sk").write_text(secret)
    proc = run_cli("key", "public", tmp_path / "sk")
    assert proc.returncode == 0 and proc.stdout.strip() == public
    msg = b"1;/nix/store/x;sha256:abc;1;"
    assert PublicKey.parse(public).verify(key.sign(msg), msg)


@pytest.mark.nix
def test_pylmserv_made_key_works_in_nix(nix, tmp_path):
    out = tmp_path / "team.sk"
    proc = run_cli("key", "generate", "team-cache-2", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    secret = out.read_text()
    assert secret.startswith("team-cache-2:") and "\n" not in secret  # as `nix key generate-secret` writes it
    assert len(base64.b64decode(secret.split(":", 1)[1])) == 64
    public = nixrun("nix", "key", "convert-secret-to-public", input=secret).stdout.strip()
    assert proc.stdout.strip() == public  # the public key pylmserv printed is Nix's
    # -o never overwrites a key
    again = run_cli("key", "generate", "other", "-o", out)
    assert again.returncode == 2 and "exists" in again.stderr and out.read_text() == secret
    # without -o the secret goes to stdout, like nix key generate-secret
    proc = run_cli("key", "generate", "k3")
    assert proc.returncode == 0 and SecretKey.parse(proc.stdout).name == "k3"


DRV = ('derivation {{ name = "pylmserv-signing-{tag}"; system = builtins.currentSystem; builder = "/bin/sh"; '
       'args = [ "-c" "echo {tag} > $out" ]; }}')


def built_path(tag: str) -> str:
    """An input-addressed store path (not content-addressed: those need no signature)."""
    return nixrun("nix-build", "--no-out-link", "-E", DRV.format(tag=tag)).stdout.strip()


def path_info(path: str, store=None) -> dict:
    argv = ["nix", "path-info", "--json", "--sigs", path] + (["--store", store] if store else [])
    return json.loads(nixrun(*argv).stdout)[0]


def fingerprint_of(info: dict) -> bytes:
    nar = Hash.parse(info["narHash"])
    return narinfo_fingerprint(info["path"], f"sha256:{nar.nix32}", info["narSize"], info["references"])


@pytest.mark.nix
def test_signature_by_nix_verifies_in_pylmserv(nix, tmp_path):
    secret = nixrun("nix", "key", "generate-secret", "--key-name", "nix-signer-1").stdout
    (tmp_path / "sk").write_text(secret)
    public = PublicKey.parse(nixrun("nix", "key", "convert-secret-to-public", input=secret).stdout)
    path = built_path("nixsig")
    nixrun("nix", "store", "sign", "--key-file", str(tmp_path / "sk"), path)
    info = path_info(path)
    sigs = [s for s in info["signatures"] if s.startswith("nix-signer-1:")]
    assert sigs
    assert check_signatures(sigs, [public], fingerprint_of(info)) == public
    # the same signature over another fingerprint (a lying NarSize) does not verify
    lie = dict(info, narSize=info["narSize"] + 1)
    with pytest.raises(VerificationError, match="bad signature by nix-signer-1"):
        check_signatures(sigs, [public], fingerprint_of(lie))


@pytest.mark.nix
def test_signature_by_pylmserv_verifies_in_nix(nix, tmp_path):
    """pylmserv signs a path's fingerprint; its `Sig:` line in a file:// binary cache's
    narinfo is what `nix store verify` checks against --trusted-public-keys."""
    path = built_path("pysig")
    cache = tmp_path / "cache"
    nixrun("nix", "copy", "--to", f"file://{cache}", path)
    store = f"file://{cache}"
    key = SecretKey.generate("pylmserv-signer-1")
    other = SecretKey.generate("pylmserv-signer-1")  # same name, another key
    verify = ["nix", "store", "verify", "--store", store, "--trusted-public-keys"]
    assert nixrun(*verify, str(key.public), path, check=False).returncode != 0  # unsigned: untrusted
    info = path_info(path, store)
    (narinfo,) = cache.glob("*.narinfo")
    narinfo.write_text(narinfo.read_text().rstrip("\n") + f"\nSig: {key.sign(fingerprint_of(info))}\n")
    ok = nixrun(*verify, str(key.public), path, check=False)
    assert ok.returncode == 0, ok.stderr
    bad = nixrun(*verify, str(other.public), path, check=False)
    assert bad.returncode != 0 and "untrusted" in bad.stderr


def test_parse_refuses_damaged_keys():
    key = SecretKey.generate("k")
    raw = bytearray(key.raw)
    raw[40] ^= 1  # the public half no longer belongs to the seed
    with pytest.raises(UsageError, match="not the public key of its seed"):
        SecretKey.parse("k:" + base64.b64encode(bytes(raw)).decode())
    for text in ("k", ":abc", "k:not base64!", "k:" + base64.b64encode(b"short").decode()):
        with pytest.raises(UsageError):
            SecretKey.parse(text)
    with pytest.raises(UsageError):
        SecretKey.generate("bad:name")
    assert key.to_text().split(":", 1)[1] not in repr(key)


def test_check_signatures_says_which_way_it_failed():
    a, b = SecretKey.generate("a-1"), SecretKey.generate("b-1")
    msg = b"pylmserv-build;1;key;digest"
    assert check_signatures([str(b.sign(msg)), str(a.sign(msg))], [a.public], msg) == a.public
    with pytest.raises(VerificationError, match="untrusted key b-1"):
        check_signatures([str(b.sign(msg))], [a.public], msg)
    with pytest.raises(VerificationError, match="bad signature by a-1"):
        check_signatures([str(a.sign(msg + b"x"))], [a.public], msg)
    with pytest.raises(VerificationError, match="not signed"):
        check_signatures([], [a.public], msg)
    with pytest.raises(VerificationError, match="bad signature"):
        check_signatures(["a-1:" + base64.b64encode(os.urandom(64)).decode()], [a.public], msg)
    assert parse_public_keys([f"{a.public}  {b.public}"]) == [a.public, b.public]
    assert Signature.parse(str(a.sign(msg))).name == "a-1"
