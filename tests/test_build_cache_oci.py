"""A build cache in a real OCI registry (docker-registry on 127.0.0.1): the signed manifest
as an artifact's config blob, each file a raw layer whose digest is its sha256, tagged with
the cache key. Needs the registry client of the model-sharing work (transfer/oci.py) and its
registry fixture (tests/support/registry.py): skipped until both are in the tree."""
from __future__ import annotations

import json

import pytest

oci = pytest.importorskip("pylmserv.transfer.oci")
registry_support = pytest.importorskip("tests.support.registry")

from pylmserv.builders.substitute import check_manifest  # noqa: E402
from pylmserv.core.errors import VerificationError  # noqa: E402
from pylmserv.core.signing import PublicKey  # noqa: E402
from pylmserv.transfer.buildcache import DirectoryCache, OciCache  # noqa: E402
from tests.test_build_cache import build_and_push, world  # noqa: E402,F401  (the fixture)


def test_build_round_trips_through_a_registry_and_tampered_layers_are_refused(world, tmp_path):  # noqa: F811
    w = world
    _, pushed = build_and_push(w)
    directory = DirectoryCache(w.cache)
    key = pushed["key"]
    body = directory.get_manifest(key)
    with registry_support.registry(tmp_path / "registry") as server:
        url = f"oci://{server.host}/team/llama-cpp"
        cache = OciCache(oci.Registry(oci.OciRef.parse(url)), url)
        assert cache.get_manifest(key) is None  # not pushed yet: none, not an error
        for hexdigest in pushed["files"].values():
            cache.put_blob(hexdigest, w.cache / "sha256" / hexdigest)
        cache.put_manifest(key, body)
        got = cache.get_manifest(key)
        assert got == body
        doc, signer = check_manifest(got, key, [PublicKey.parse(w.public)], ["llama-cli", "llama-server"])
        assert signer.name == "team-cache-1"
        for f in doc["files"]:
            dest = tmp_path / f"got-{f['name']}"
            cache.get_blob(f["sha256"], dest, f["size"])
            assert dest.read_bytes() == (w.cache / "sha256" / f["sha256"]).read_bytes()
        # the registry's storage now holds other bytes for one layer: refused, nothing kept
        victim = pushed["files"]["llama-cli"]
        (data,) = (tmp_path / "registry" / "data").rglob(f"blobs/sha256/{victim[:2]}/{victim}/data")
        data.write_bytes(b"#!/bin/sh\necho owned\n")
        dest = tmp_path / "tampered"
        with pytest.raises(VerificationError):
            cache.get_blob(victim, dest, None)
        assert not dest.exists()
        manifest = json.loads(oci.Registry(oci.OciRef.parse(url)).get_manifest(key)[0])
        assert {layer["digest"] for layer in manifest["layers"]} == {f"sha256:{h}" for h in pushed["files"].values()}

