"""Real Nix builds of the flake's fixed-output derivations, from a lock pylmserv wrote.

Models, a GitHub-style tarball, a zip, a flat toolchain zip and a git checkout are
served on 127.0.0.1 (git: file://); pylmserv computes their pins (tests/support/
flakeworld.py); the repo's flake is copied next to that lock and `nix build` must
accept every hash, land on the store path nixpkgs' fetchers would use, refuse an
altered hash, and report pylmserv's hash back for an empty one. The repo's own
flake.lock (real nixpkgs pin) is used unchanged: these outputs never fetch nixpkgs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import pytest

from pylmserv.pins import nixmsg
from pylmserv.core.hashing import Hash
from tests.support import flakeworld as fw
from tests.support.httpserver import serve_directory
from tests.support.nixenv import have_nix, nix_env
from tests.support.tools import missing, require  # noqa: F401

pytestmark = pytest.mark.nix


@pytest.fixture
def fresh_world(nix, tmp_path, http_dir):
    """Served and pinned for this test alone: nothing of it can be in the store yet."""
    root, base = http_dir
    return fw.build_world(tmp_path, root, base)


@pytest.fixture(scope="module")
def shared_world(tmp_path_factory):
    """One served + prefetched world for the tests that edit the lock (prefetch is slow)."""
    if not have_nix():
        if os.environ.get("CI"):
            pytest.fail("nix-bin is not installed; .ci/run installs it")
        missing("real Nix", "apt-get install nix-bin; scripts/setup-dev.sh installs it")
    patch = pytest.MonkeyPatch()
    for key, value in nix_env().items():
        patch.setenv(key, value)
    tmp = tmp_path_factory.mktemp("flakeworld")
    www = tmp / "www"
    www.mkdir()
    try:
        with serve_directory(www) as base:
            yield fw.build_world(tmp, www, base)
    finally:
        patch.undo()


@pytest.fixture
def world(nix, shared_world, tmp_path):
    """The shared world with a private copy of the flake and its lock."""
    flake = tmp_path / "flake"
    shutil.copytree(shared_world.flake, flake, symlinks=True)
    return dataclasses.replace(shared_world, flake=flake)


def _ref(world, output):
    return f"path:{world.flake}#{output}"


def _build(world, *outputs):
    return fw.nix("nix", "build", "--no-link", "--json", *[_ref(world, o) for o in outputs])


def _out_path(world, output):
    proc = _build(world, output)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]["outputs"]["out"]


def test_nix_builds_every_fixed_output_with_pylmserv_hashes(fresh_world):
    world = fresh_world
    for output in world.outputs:  # not in the store: the build below must fetch and verify
        entry = world.entry(output)
        name = "source" if entry.mode == "nar" else (entry.get("file") or entry.url.rsplit("/", 1)[-1])
        path = fw.fixed_path(entry.hash, name, recursive=entry.mode == "nar")
        assert fw.nix("nix-store", "--check-validity", path).returncode != 0, path
    proc = _build(world, *world.outputs)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == len(world.outputs)
    paths = {output: _out_path(world, output) for output in world.outputs}  # all built now: no fetches

    for output in world.outputs:
        entry = world.entry(output)
        got = paths[output]
        if entry.mode == "flat":
            # What nixpkgs' fetchurl { url; hash; } would produce: flat hash, base name.
            name = entry.get("file") or entry.url.rsplit("/", 1)[-1]
            assert got == fw.fixed_path(entry.hash, name, recursive=False), output
            assert Hash.parse(fw.nix("nix", "hash", "file", got).stdout.strip()) == world.expected[output]
        else:
            # What fetchFromGitHub / fetchzip / fetchgit would produce: NAR hash, "source".
            assert got == fw.fixed_path(entry.hash, "source", recursive=True), output
            assert Hash.parse(fw.nix("nix", "hash", "path", got).stdout.strip()) == world.expected[output]

    with open(paths["model-tiny"], "rb") as f:
        assert f.read() == world.model_bytes


def test_built_tree_keeps_modes_and_symlinks_like_fetchzip(world):
    tree = _out_path(world, "source-llama-cpp")

    # The single top-level directory is stripped, the exec bit and the symlink survive.
    assert sorted(os.listdir(tree)) == ["LINK", "README.md", "bin", "src"]
    assert os.access(os.path.join(tree, "bin", "run.sh"), os.X_OK)
    assert os.readlink(os.path.join(tree, "LINK")) == "README.md"


def test_git_source_with_submodules_has_them_checked_out(world):
    tree = _out_path(world, "source-stack")
    assert world.lock.sources["stack"].get("submodules") is True
    assert os.path.isfile(os.path.join(tree, "third_party", "sub", "s.c"))
    assert not os.path.exists(os.path.join(tree, ".git"))
    assert os.access(os.path.join(tree, "run"), os.X_OK)


@pytest.mark.parametrize("output", ["model-tiny", "source-llama-cpp", "source-tool", "source-cosmocc-3_3_6",
                                    "source-gadget", "source-stack"])
def test_nix_refuses_an_altered_hash(world, output):
    wrong = Hash.of_bytes(b"tampered " + output.encode())
    fw.set_hash(world, output, wrong.sri)
    proc = _build(world, output)
    assert proc.returncode != 0
    assert "mismatch" in proc.stderr, proc.stderr
    true_hash = world.expected[output]
    if output.startswith("source-") and world.entry(output).mode == "nar":
        # builtins.fetchGit / builtins.fetchTree (locked by narHash):
        # "NAR hash mismatch in input ..., expected 'X', got 'Y'"
        assert re.search(r"got '" + re.escape(true_hash.sri) + "'", proc.stderr), proc.stderr
    else:
        assert nixmsg.got_hash(proc.stderr) == true_hash


@pytest.mark.parametrize("output", ["model-tiny", "source-llamafile", "source-tool", "source-cosmocc-3_3_6",
                                    "source-gadget", "source-stack"])
def test_empty_hash_trick_reports_pylmserv_hash(world, output):
    fw.set_hash(world, output, "")
    proc = _build(world, output)
    assert proc.returncode != 0
    assert nixmsg.got_hash(proc.stderr) == world.expected[output], proc.stderr


def test_fixed_outputs_build_with_the_real_flake_lock_unchanged(world):
    """The copied flake.lock pins github:NixOS/nixpkgs, unreachable here: building a
    model and a source anyway shows these outputs never force nixpkgs."""
    assert (world.flake / "flake.lock").read_bytes() == (fw.REPO / "flake.lock").read_bytes()
    proc = _build(world, "model-tiny", "source-tool")
    assert proc.returncode == 0, proc.stderr
    assert "github.com" not in proc.stderr
    assert (world.flake / "flake.lock").read_bytes() == (fw.REPO / "flake.lock").read_bytes()


@pytest.mark.parametrize("section, old, new, output, message", [
    ("# Generated", "version = 2", "version = 3", "model-tiny", "unsupported lock version 3 (this flake reads versions 1 and 2)"),
    ("[models.tiny]", 'mode = "flat"', 'mode = "zip"', "model-tiny", 'has mode "zip"; expected "flat" or "nar"'),
    ("[sources.gadget]", 'rev = "', 'rev = "release" #', "source-gadget",
     "is not a full commit hash; run `pylmserv prefetch --refresh`"),
], ids=["lock-version", "mode", "git-rev"])
def test_bad_lock_is_one_clear_evaluation_error(world, section, old, new, output, message):
    lock = world.flake / "pylmserv.lock"
    head, sep, tail = lock.read_text().partition(section)
    assert sep == section and old in tail
    lock.write_text(head + sep + tail.replace(old, new, 1))
    proc = _build(world, output)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "pylmserv.lock" in proc.stderr


# -- defect 5: a git pin's hash is for one fetcher, and the flake uses that fetcher --------

def _eval(world, attr, *extra):
    proc = fw.nix("nix", "eval", "--json", *extra, f"path:{world.flake}#{attr}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_git_pin_without_fetcher_field_is_builtins_fetchgit_like_pylmserv(world):
    """pylmserv hashes a git pin without submodules as Nix 2.8's builtins.fetchGit does
    (`git archive`: export-ignore files dropped); the flake uses that fetcher."""
    lock = world.flake / "pylmserv.lock"
    text = lock.read_text()
    assert 'fetcher = "builtins.fetchGit"' in text  # prefetch names it (lock version 2)...
    lock.write_text("".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith("fetcher =")))
    assert "fetcher =" not in lock.read_text()  # ...and a lock without it (version 1) means the same
    assert _eval(world, "packages.x86_64-linux.source-gadget.pin.fetcher") == "builtins.fetchGit"
    tree = _out_path(world, "source-gadget")
    assert os.path.isfile(os.path.join(tree, "gadget.txt"))
    assert not os.path.exists(os.path.join(tree, "private.txt"))  # export-ignore


def test_git_pin_for_fetchgit_is_fetched_with_nixpkgs_fetchgit(fresh_world, tmp_path):
    """`fetcher = "fetchgit"`: nixpkgs' fetchgit (a checkout, export-ignore files kept),
    here the stand-in's real fetchgit FOD. The builtins.fetchGit hash is then wrong and
    Nix says so; the checkout's own NAR hash (computed by Nix on a plain clone) is right.
    A fresh world: a fixed-output path fetched before by builtins.fetchGit would be
    valid already, and Nix would not fetch again."""
    world = fresh_world
    entry = world.lock.sources["gadget"]
    fw.set_field(world, "source-gadget", "fetcher", "fetchgit")
    override = fw.override_nixpkgs()
    assert _eval(world, "packages.x86_64-linux.source-gadget.pin.fetcher", *override) == "fetchgit"
    assert fw.nix("nix-store", "--check-validity", fw.fixed_path(entry.hash, "source", recursive=True)).returncode != 0

    wrong = fw.nix("nix", "build", "--no-link", *override, _ref(world, "source-gadget"))
    assert wrong.returncode != 0 and "hash mismatch" in wrong.stderr, wrong.stderr
    got = nixmsg.got_hash(wrong.stderr)
    assert got != entry.hash

    clone = tmp_path / "clone"
    fw.nix("git", "clone", "-q", entry.url, str(clone))
    fw.nix("git", "-C", str(clone), "checkout", "-q", entry.rev)
    shutil.rmtree(clone / ".git")
    checkout_hash = Hash.parse(fw.nix("nix", "hash", "path", str(clone)).stdout.strip())
    assert got == checkout_hash

    fw.set_hash(world, "source-gadget", checkout_hash.sri)
    proc = fw.nix("nix", "build", "--no-link", "--json", *override, _ref(world, "source-gadget"))
    assert proc.returncode == 0, proc.stderr
    tree = json.loads(proc.stdout)[0]["outputs"]["out"]
    assert tree == fw.fixed_path(checkout_hash, "source", recursive=True)
    assert os.path.isfile(os.path.join(tree, "private.txt")) and not os.path.exists(os.path.join(tree, ".git"))


def test_fetchgit_pin_without_nixpkgs_is_a_clear_error(world):
    """The flake-level `lib` has no nixpkgs: a fetchgit pin says why it cannot be fetched."""
    fw.set_field(world, "source-gadget", "fetcher", "fetchgit")
    proc = fw.nix("nix", "eval", "--raw", f"path:{world.flake}#lib.sources.gadget.outPath")
    assert proc.returncode != 0
    assert "pylmserv.lock: [sources.gadget] is pinned for nixpkgs' fetchgit" in proc.stderr, proc.stderr
