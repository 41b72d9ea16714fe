"""The flake's outputs through a signed binary cache over HTTP, Nix's own way (Nix 2.8).

A flake output built here for real (cosmocc, input-addressed, built with the nixpkgs
stand-in) and a model (a fixed-output derivation) are copied with `nix copy` into a binary
cache signed on the way (`?secret-key=`, the key made by `pylmserv key generate`: one key for
both caches); a real nginx serves it on 127.0.0.1. The origin of the sources is stopped.
A second, empty Nix store (`--store DIR`) substitutes both with only the public key trusted
and local builds forbidden (`--max-jobs 0`); a third store trusting another key refuses the
signed output (a fixed-output path needs no signature: its hash is its proof).
"""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_cli
from tests.support import flakeworld as fw
from tests.support import nginx
from tests.support.httpserver import serve_directory

pytestmark = pytest.mark.nix


def build(flake, output, *extra):
    proc = fw.nix("nix", "build", "--no-link", "--json", *extra, f"path:{flake}#{output}")
    return proc, (json.loads(proc.stdout)[0]["outputs"]["out"] if proc.returncode == 0 else None)


def test_flake_outputs_round_trip_through_a_signed_http_cache(nix, tmp_path):
    nginx.require_nginx()
    key_file = tmp_path / "team.sk"
    made = run_cli("key", "generate", "team-cache-1", "-o", key_file)
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    (tmp_path / "other.sk").write_text(run_cli("key", "generate", "someone-else-1", check=True).stdout)
    other_public = run_cli("key", "public", tmp_path / "other.sk", check=True).stdout.strip()

    www = tmp_path / "www"
    www.mkdir()
    cache = tmp_path / "cache"
    with serve_directory(www) as base:
        world = fw.build_world(tmp_path, www, base)
        proc, model = build(world.flake, "model-tiny")
        assert proc.returncode == 0, proc.stderr
        proc, cosmocc = build(world.flake, "cosmocc", *fw.override_nixpkgs())
        assert proc.returncode == 0, proc.stderr
        copy = fw.nix("nix", "copy", "--to", f"file://{cache}?secret-key={key_file}", model, cosmocc)
        assert copy.returncode == 0, copy.stderr
    # the origin is gone; the cache is signed: every narinfo carries team-cache-1's Sig
    narinfos = list(cache.glob("*.narinfo"))
    assert narinfos and all("\nSig: team-cache-1:" in p.read_text() for p in narinfos)

    with nginx.serve(cache, tmp_path / "nginx") as url:
        def from_cache(store, trusted):
            return ["--store", str(store), "--max-jobs", "0", "--option", "substituters", url,
                    "--option", "trusted-public-keys", trusted, "--option", "require-sigs", "true"]

        store2 = tmp_path / "store2"
        proc, got = build(world.flake, "cosmocc", *from_cache(store2, public), *fw.override_nixpkgs())
        assert proc.returncode == 0, proc.stderr
        assert got == cosmocc and os.path.isdir(str(store2) + cosmocc)
        proc, got_model = build(world.flake, "model-tiny", *from_cache(store2, public))
        assert proc.returncode == 0 and got_model == model, proc.stderr
        with open(str(store2) + model, "rb") as f:
            assert f.read() == world.model_bytes
        verify = fw.nix("nix", "store", "verify", "--store", str(store2), "--trusted-public-keys", public, cosmocc)
        assert verify.returncode == 0, verify.stderr

        # Another key trusted: the signed, input-addressed output is refused; with local builds
        # forbidden, nothing lands in the store.
        store3 = tmp_path / "store3"
        proc, _ = build(world.flake, "cosmocc", *from_cache(store3, other_public), *fw.override_nixpkgs())
        assert proc.returncode != 0
        assert "is not signed by any of the keys in 'trusted-public-keys'" in proc.stderr, proc.stderr
        assert not os.path.exists(str(store3) + cosmocc)
        copy = fw.nix("nix", "copy", "--from", url, "--to", str(store3), "--option", "trusted-public-keys",
                      other_public, cosmocc)
        assert copy.returncode != 0 and "lacks a valid signature" in copy.stderr, copy.stderr
        # the fixed-output model needs no signature: Nix checks its hash
        proc, got_model = build(world.flake, "model-tiny", *from_cache(store3, other_public))
        assert proc.returncode == 0 and got_model == model, proc.stderr


def test_model_fod_comes_from_a_content_addressed_mirror(nix, tmp_path):
    """A model's fixed-output derivation (builtin:fetchurl) fetched with its origin gone, from
    a mirror in the content-addressed layout (BASE/sha256/HEX, the layout pylmserv's mirrors
    and build caches use) that Nix's `hashed-mirrors` setting names; a mirror serving other
    bytes under that name is refused by the hash."""
    nginx.require_nginx()
    www = tmp_path / "www"
    www.mkdir()
    with serve_directory(www) as base:
        world = fw.build_world(tmp_path, www, base)
    digest = world.expected["model-tiny"].hex
    mirror = tmp_path / "mirror"
    (mirror / "sha256").mkdir(parents=True)
    (mirror / "sha256" / digest).write_bytes(world.model_bytes)
    with nginx.serve(mirror, tmp_path / "nginx") as url:
        store = tmp_path / "store2"
        proc, got = build(world.flake, "model-tiny", "--store", str(store), "--option", "hashed-mirrors", url)
        assert proc.returncode == 0, proc.stderr
        with open(str(store) + got, "rb") as f:
            assert f.read() == world.model_bytes
        (mirror / "sha256" / digest).write_bytes(world.model_bytes[:-1] + b"x")
        proc, _ = build(world.flake, "model-tiny", "--store", str(tmp_path / "store3"), "--option", "hashed-mirrors",
                        url)
        assert proc.returncode != 0  # the lying mirror is refused, and the origin is gone
