"""Every Nix file of the flake (and of the nixpkgs stand-in) parses with the real Nix."""
from __future__ import annotations

import pytest

from tests.support import flakeworld as fw

NIX_FILES = sorted([fw.REPO / "flake.nix", *(fw.REPO / "nix").glob("*.nix"), *fw.STANDIN_SRC.glob("*.nix")])


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


def test_flake_lock_pins_a_supported_nixpkgs_release():
    """Defect 3: not an end-of-life release (24.11's ROCm is below HIP 6.1); the pair in
    flake.lock is the one flake.nix names as copied from published flake.lock files."""
    import json
    import re

    lock = json.loads((fw.REPO / "flake.lock").read_text())
    node = lock["nodes"][lock["nodes"]["root"]["inputs"]["nixpkgs"]]
    flake_nix = (fw.REPO / "flake.nix").read_text()
    branch = node["original"]["ref"]
    year, month = map(int, re.fullmatch(r"nixos-(\d\d)\.(\d\d)", branch).groups())
    assert (year, month) >= (25, 11), f"{branch} is end-of-life"
    assert f'inputs.nixpkgs.url = "github:NixOS/nixpkgs/{branch}"' in flake_nix
    locked = node["locked"]
    assert locked["rev"] in flake_nix and locked["narHash"] in flake_nix and str(locked["lastModified"]) in flake_nix
    assert re.fullmatch(r"[0-9a-f]{40}", locked["rev"]) and re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked["narHash"])
