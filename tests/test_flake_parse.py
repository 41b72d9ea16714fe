"""Every Nix file of the flake (and of the nixpkgs stand-in) parses with the real Nix."""
from __future__ import annotations

import pytest

from tests.support import flakeworld as fw

NIX_FILES = sorted([fw.REPO / "flake.nix", *(fw.REPO / "nix").glob("*.nix"), *fw.STANDIN.glob("*.nix")])


def test_the_flake_has_the_files_the_issue_names():
    names = {p.name for p in (fw.REPO / "nix").glob("*.nix")}
    assert {"sources.nix", "llama-cpp.nix", "cosmocc.nix", "llamafile.nix", "pylmserv.nix", "shells.nix"} <= names
    assert (fw.REPO / "flake.lock").is_file()


@pytest.mark.nix
@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(fw.REPO)))
def test_nix_file_parses(nix, path):
    proc = fw.nix("nix-instantiate", "--parse", str(path))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.nix
def test_parse_catches_a_broken_file(nix, tmp_path):
    broken = tmp_path / "broken.nix"
    broken.write_text((fw.REPO / "nix" / "sources.nix").read_text().replace("in\n", "in in\n", 1))
    proc = fw.nix("nix-instantiate", "--parse", str(broken))
    assert proc.returncode != 0


def test_flake_lock_pins_a_published_nixpkgs():
    import json

    lock = json.loads((fw.REPO / "flake.lock").read_text())
    node = lock["nodes"][lock["nodes"]["root"]["inputs"]["nixpkgs"]]["locked"]
    # The published nixos-24.11 pair named in flake.nix (copied, not invented).
    assert node["rev"] == "50ab793786d9de88ee30ec4e4c24fb4236fc2674"
    assert node["narHash"] == "sha256-/bVBlRpECLVzjV19t5KMdMFWSwKLtb5RyXdjz3LJT+g="
    assert node["rev"] in (fw.REPO / "flake.nix").read_text()
