"""Stand-in based builds: cosmocc and llamafile built for real by `nix build`, with the
nixpkgs stand-in's generic builder (tests/nixpkgs-standin/setup.sh, host tools) in place
of nixpkgs' stdenv, from fixture sources pinned by `pylmserv prefetch` on 127.0.0.1.

What this runs for real: cosmocc.nix's unzip + exec-bit fix on a zip whose tool has no
exec bit; llamafile.nix's pre-seed of .cosmocc/<version> (the Makefile's download rule
must not fire), its HOME for the APE loader, `make` and `make install` with PREFIX=$out.
The toolchain is a fixture (the real cosmocc zip cannot be fetched here).
"""
from __future__ import annotations

import json
import os

import pytest

from tests.support import flakeworld as fw

pytestmark = pytest.mark.nix


@pytest.fixture
def world(nix, tmp_path, http_dir):
    root, base = http_dir
    return fw.build_world(tmp_path, root, base)


def _override():
    return fw.override_nixpkgs()


def _build(world, output):
    proc = fw.nix("nix", "build", "--no-link", "--json", *_override(), f"path:{world.flake}#{output}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]["outputs"]["out"]


def test_cosmocc_is_unpacked_with_exec_bits_fixed(world):
    out = _build(world, "cosmocc")
    tool = os.path.join(out, "bin", "cosmocc")
    assert os.access(tool, os.X_OK), "the zip stored bin/cosmocc as 0644; cosmocc.nix must fix it"
    with open(tool) as f:
        assert world.salt in f.read()
    assert os.path.isfile(os.path.join(out, "README.md"))  # unpacked at the top, no extra level


def test_llamafile_builds_with_the_pre_seeded_cosmocc(world):
    out = _build(world, "llamafile")
    with open(os.path.join(out, "bin", "llamafile"), "rb") as f:
        data = f.read()
    assert data.startswith(b"MZqFpD='")
    # Built by the locked cosmocc (carries this world's salt), not by the Makefile's
    # download rule (which would have written DOWNLOADED).
    assert f"fixture cosmocc {world.salt}".encode() in data
    assert b"DOWNLOADED" not in data


def test_without_home_the_ape_toolchain_fails(world):
    """The HOME export is what makes the APE tools run: drop it and the build fails."""
    drv = fw.nix("nix", "eval", "--raw", *_override(), f"path:{world.flake}#packages.x86_64-linux.llamafile",
                 "--apply", 'p: (p.overrideAttrs (_: { preBuild = ""; })).drvPath')
    assert drv.returncode == 0, drv.stderr
    proc = fw.nix("nix-store", "--realise", drv.stdout.strip())
    assert proc.returncode != 0
    assert "HOME=/homeless-shelter is not writable" in proc.stderr
    assert not os.path.exists("/homeless-shelter")


def test_without_the_pre_seed_the_download_rule_is_refused(world):
    """Drop the pre-seed symlink but keep the neutered download script: make reaches for
    the download rule and the build stops loudly instead of fetching."""
    drv = fw.nix("nix", "eval", "--raw", *_override(), f"path:{world.flake}#packages.x86_64-linux.llamafile",
                 "--apply", 'p: (p.overrideAttrs (old: { postPatch = builtins.replaceStrings [ "ln -s " ] [ "true " ] old.postPatch; })).drvPath')
    assert drv.returncode == 0, drv.stderr
    proc = fw.nix("nix-store", "--realise", drv.stdout.strip())
    assert proc.returncode != 0
    assert "no downloads in a Nix build" in proc.stderr
