"""The binary-cache path a team uses to share builds, with Nix's own machinery.

Built here for real: the flake's nixpkgs-free outputs (a model: builtin:fetchurl; source
trees: builtins.fetchTree; a flat toolchain zip) from a lock served on 127.0.0.1, and
the stand-in builds that really run (cosmocc and llamafile with the nixpkgs stand-in).
They are copied with `nix copy` to a `file://` binary cache; the origin server is then
stopped, and a second, empty Nix store (`--store <dir>`) gets every output from the
cache by substitution: same store paths, same contents, no origin needed. Also: with
the cache gone as well, the second store cannot get them (the test can fail).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.support import flakeworld as fw
from tests.support.httpserver import serve_directory

pytestmark = pytest.mark.nix

FREE = ["model-tiny", "source-llama-cpp", "source-tool", "source-cosmocc-3_3_6"]
STANDIN_BUILT = ["cosmocc", "llamafile"]


def _ref(flake, output):
    return f"path:{flake}#{output}"


def _build(flake, outputs, *extra):
    """output name -> store path (one `nix build` per output: its --json is unordered)."""
    paths = {}
    for output in outputs:
        proc = fw.nix("nix", "build", "--no-link", "--json", *extra, _ref(flake, output))
        assert proc.returncode == 0, proc.stderr
        paths[output] = json.loads(proc.stdout)[0]["outputs"]["out"]
    return paths


def test_outputs_come_from_a_file_binary_cache_into_an_empty_store(nix, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    cache = tmp_path / "cache"
    with serve_directory(www) as base:
        world = fw.build_world(tmp_path, www, base)
        free = _build(world.flake, FREE)
        built = _build(world.flake, STANDIN_BUILT, *fw.override_nixpkgs())
        copy = fw.nix("nix", "copy", "--to", f"file://{cache}", *free.values(), *built.values())
        assert copy.returncode == 0, copy.stderr
    # The origin is gone now; only the cache is left.
    assert (cache / "nix-cache-info").is_file()
    assert len(list(cache.glob("*.narinfo"))) >= len(FREE) + len(STANDIN_BUILT)

    store2 = tmp_path / "store2"
    from_cache = ["--store", str(store2), "--option", "substituters", f"file://{cache}",
                  "--option", "require-sigs", "false"]
    got_free = _build(world.flake, FREE, *from_cache)
    got_built = _build(world.flake, STANDIN_BUILT, *from_cache, *fw.override_nixpkgs())
    assert got_free == free and got_built == built  # the same store paths
    for path in [*got_free.values(), *got_built.values()]:
        assert os.path.lexists(str(store2) + path), path  # in the second store's tree
    with open(str(store2) + free["model-tiny"], "rb") as f:
        assert f.read() == world.model_bytes
    with open(os.path.join(str(store2) + built["llamafile"], "bin", "llamafile"), "rb") as f:
        assert f"fixture cosmocc {world.salt}".encode() in f.read()

    # Without the cache (and the origin) a third empty store cannot get them.
    shutil.rmtree(cache)
    store3 = tmp_path / "store3"
    proc = fw.nix("nix", "build", "--no-link", "--store", str(store3), "--option", "substituters", "",
                  _ref(world.flake, "model-tiny"))
    assert proc.returncode != 0
