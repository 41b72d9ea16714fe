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
import shutil
import subprocess
import sys
from pathlib import Path

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


# -- the dev shells (defects 7 and 8) -----------------------------------------------------

def _eval_raw(flake, attr, apply=None):
    proc = fw.nix("nix", "eval", "--raw", *_override(), f"path:{flake}#{attr}", *(["--apply", apply] if apply else []))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _realise(drv_path):
    proc = fw.nix("nix-store", "--realise", drv_path)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[0]


@pytest.fixture
def repo_flake(nix, tmp_path):
    flake = fw.copy_flake(tmp_path / "flake")
    shutil.copy2(fw.REPO / "pylmserv.lock", flake / "pylmserv.lock")
    return flake


def test_cuda_shell_has_one_cuda_root_where_pylmserv_finds_cublas(repo_flake):
    """Defect 7: nixpkgs splits CUDA over packages and outputs (the stand-in builds that
    layout as marker files); CUDA_PATH is their symlinkJoin, built here for real, and
    pylmserv's own cuBLAS preflight finds the library under it. CUDA_PATH = cuda_nvcc
    alone (what the shell had) fails the same preflight."""
    from pylmserv.builders.backends.cuda import detect_cublas
    from pylmserv.builders.probe import Tool

    root = _realise(_eval_raw(repo_flake, "devShells.x86_64-linux.cuda.cudaRoot.drvPath"))
    assert _eval_raw(repo_flake, "devShells.x86_64-linux.cuda.CUDA_PATH") == root
    for rel in ("bin/nvcc", "include/cuda_runtime.h", "include/cublas_v2.h", "lib/libcublas.so", "lib/libcudart.so",
                "lib/stubs/libcuda.so"):
        assert os.path.exists(os.path.join(root, rel)), rel
    nvcc = Tool("nvcc", os.path.join(root, "bin", "nvcc"), (12, 8), "env", "")
    assert detect_cublas(nvcc, env={"CUDA_PATH": root}).found

    nvcc_only = _realise(_eval_raw(repo_flake, "devShells.x86_64-linux.cuda.cudaParts", "ps: (builtins.head ps).drvPath"))
    assert os.path.exists(os.path.join(nvcc_only, "bin", "nvcc"))
    assert not detect_cublas(nvcc, env={"CUDA_PATH": nvcc_only}, roots=[Path(nvcc_only)]).found


def _run_hook(hook: str, cwd: Path, env: dict, then: str) -> subprocess.CompletedProcess:
    """The shell hook under bash, as `nix develop` runs it, then a command."""
    return subprocess.run(["bash", "-c", f"set -e\n{hook}\n{then}"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_dev_shell_pylmserv_is_an_editable_install_usable_from_any_directory(repo_flake, tmp_path):
    """Defect 7: no shell function with PYTHONPATH=$PWD. The hook installs the working
    tree (editable) into a venv outside it; run with this machine's Python as the
    shell's python (the stand-in's python env is not buildable)."""
    hook = _eval_raw(repo_flake, "devShells.x86_64-linux.default.shellHook")
    tree = tmp_path / "checkout"
    shutil.copytree(repo_flake, tree)
    (tree / "sub" / "deeper").mkdir(parents=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYLMSERV_HOME": str(tmp_path / "plhome"),
           "PYLMSERV_COSMOCC_ZIP": str(tree / "pyproject.toml")}
    proc = _run_hook(hook, tree, env, "cd sub/deeper && command -v pylmserv && pylmserv --version && "
                                      "python -c 'import pylmserv; print(pylmserv.__file__)'")
    assert proc.returncode == 0, proc.stderr
    where, version, module = proc.stdout.splitlines()[:3]
    assert where.startswith(str(tmp_path / "cache" / "pylmserv-devshell")) and "pylmserv" in version
    assert module == str(tree / "pylmserv" / "__init__.py")
    # Editable: an edit in the tree is seen without reinstalling.
    init = tree / "pylmserv" / "__init__.py"
    init.write_text(init.read_text() + "\nEDITED_IN_TREE = True\n")
    proc = _run_hook(hook, tree / "sub", env, "python -c 'import pylmserv; print(pylmserv.EDITED_IN_TREE)'")
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stdout + proc.stderr


def test_dev_shell_cosmocc_is_used_by_pylmserv_without_downloading(world, tmp_path):
    """Defect 8: the shell puts the locked cosmocc zip (the flake's FOD, built here from
    127.0.0.1) where pylmserv keeps verified blobs; pylmserv's own ensure_cosmocc then
    uses it with the download URL dead. Without the hook the same call fails."""
    from pylmserv.builders.cosmocc import ensure_cosmocc
    from pylmserv.pins.config import load_lock
    from pylmserv.core.errors import PylmservError

    zip_path = _build(world, "source-cosmocc-3_3_6")
    hook = _eval_raw(world.flake, "devShells.x86_64-linux.default.shellHook")
    assert _eval_raw(world.flake, "devShells.x86_64-linux.default.PYLMSERV_COSMOCC_ZIP") == zip_path

    dead = tmp_path / "dead.lock"
    text = (world.flake / "pylmserv.lock").read_text()
    url = world.lock.sources["cosmocc-3_3_6"].url
    dead.write_text(text.replace(url, "http://127.0.0.1:9/gone/cosmocc-3.3.6.zip"))
    entry = load_lock(dead, missing_ok=False).sources["cosmocc-3_3_6"]

    with pytest.raises(PylmservError):
        ensure_cosmocc(entry, root=tmp_path / "unseeded")

    home = tmp_path / "seeded"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path / "h"), "PYLMSERV_HOME": str(home),
           "PYLMSERV_COSMOCC_ZIP": zip_path}
    proc = _run_hook(hook, tmp_path, env, "true")
    assert proc.returncode == 0, proc.stderr
    cosmocc = ensure_cosmocc(entry, root=home)
    with open(os.path.join(cosmocc.root, "bin", "cosmocc")) as f:
        assert world.salt in f.read()
