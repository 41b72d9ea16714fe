"""Backend nix: nix-prefetch-url for real; nix-prefetch-git (not installed here, not on any
reachable registry) through recorded real outputs and a stand-in script named as a mock."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from pylmserv.pins.config import load_lock
from pylmserv.core.errors import NetworkError, ToolMissingError, VerificationError
from pylmserv.core.hashing import Hash
from pylmserv.pins.prefetch import prefetch
from pylmserv.pins.resolvers.nix import parse_prefetch_git, parse_prefetch_url
from tests.support import gitrepos

DATA = Path(__file__).parent / "data" / "prefetch"


def test_parse_recorded_nix_prefetch_git_outputs():
    # Real outputs (published in public repos). The 2024 one carries both encodings; they agree.
    new = parse_prefetch_git((DATA / "nix-prefetch-git-2024.json.txt").read_text())
    assert new == Hash.parse("sha256:1cpvfzdb7m16pj5ykj9dppyr1rm1gnzvhyb5qvvmg5ihbmqx6cgh")
    old = parse_prefetch_git((DATA / "nix-prefetch-git-2022-with-log.txt").read_text())
    assert old.nix32 == "1yb4dx67x3qxs2842hxhhlqb0knvz6ib2fmws50aid9mzaxbl0w0"
    with pytest.raises(NetworkError, match="no JSON"):
        parse_prefetch_git("fatal: could not read Username for 'https://github.com'\n")


def test_parse_nix_prefetch_url_output():
    h, path = parse_prefetch_url("1f1layi40aar7sfj6mbwpp9r02pp8i0zzcv9nxb15zhkdag66bv4\n/nix/store/abc-one.tar.gz\n")
    assert h.nix32 == "1f1layi40aar7sfj6mbwpp9r02pp8i0zzcv9nxb15zhkdag66bv4" and path == "/nix/store/abc-one.tar.gz"


MOCK_NIX_PREFETCH_GIT = r"""#!/usr/bin/env bash
# MOCK of nixpkgs' nix-prefetch-git (not installable here): same CLI subset, same output
# format; the checkout is hashed by the real `nix hash path`.
set -euo pipefail
url= rev= subs=false
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url=$2; shift 2;; --rev) rev=$2; shift 2;; --fetch-submodules) subs=true; shift;;
    --quiet) shift;; *) echo "unknown option $1" >&2; exit 1;;
  esac
done
if [ -n "${MOCK_CALLS:-}" ]; then echo "$url $rev $subs" >> "$MOCK_CALLS"; fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
git clone -q "$url" "$tmp/src" >&2
git -C "$tmp/src" checkout -q "$rev" >&2
if $subs; then git -C "$tmp/src" submodule -q update --init --recursive >&2; fi
find "$tmp/src" -name .git -prune -exec rm -rf {} +
hash=$(nix hash path --base32 --type sha256 "$tmp/src")
sri=$(nix hash to-sri --type sha256 "$hash")
if [ -n "${MOCK_WRONG_HASH:-}" ]; then sri=$MOCK_WRONG_HASH; fi
cat <<JSON
{
  "url": "$url",
  "rev": "$rev",
  "date": "2024-01-01T00:00:00+00:00",
  "path": "/nix/store/00000000000000000000000000000000-src",
  "sha256": "$hash",
  "hash": "$sri",
  "fetchLFS": false,
  "fetchSubmodules": $subs,
  "deepClone": false,
  "leaveDotGit": false
}
JSON
"""


@pytest.fixture
def mock_nix_prefetch_git(tmp_path, monkeypatch):
    bindir = tmp_path / "mockbin"
    bindir.mkdir()
    script = bindir / "nix-prefetch-git"
    script.write_text(MOCK_NIX_PREFETCH_GIT)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MOCK_CALLS", str(tmp_path / "mock-calls"))
    return script


def mock_calls(script) -> list:
    """The invocations the mock recorded: (url, rev, submodules)."""
    log = script.parent.parent / "mock-calls"
    return [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def git_project(tmp_path, monkeypatch):
    for k, v in gitrepos.GIT_ENV.items():
        monkeypatch.setenv(k, v)
    sub = gitrepos.make_repo(tmp_path / "sub", {"s.c": "int s;\n"})
    top = gitrepos.make_repo(tmp_path / "top", {"t.c": "int t;\n", "l": ("link", "t.c")})
    gitrepos.add_submodule(top, sub, "sub")
    gitrepos.tag(top, "v1")
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(f'[sources.top]\ntype = "git"\nurl = "{gitrepos.uri(top)}"\nref = "v1"\nsubmodules = true\n')
    return cfg


@pytest.mark.nix
def test_nix_backend_git_with_mock_nix_prefetch_git(nix, git_project, mock_nix_prefetch_git):
    py = prefetch(config=git_project, via="python").changes[0].new
    assert mock_calls(mock_nix_prefetch_git) == []
    via_nix = prefetch(config=git_project, via="nix", refresh=True)
    assert [c.status for c in via_nix.changes] == ["unchanged"]
    assert mock_calls(mock_nix_prefetch_git) == [(py.url, py.rev, "true")]  # the hash came from it
    auto = prefetch(config=git_project, via="auto", refresh=True)  # cross-checked with the mock
    assert auto.changes[0].new.hash == py.hash
    assert len(mock_calls(mock_nix_prefetch_git)) == 2


@pytest.mark.nix
def test_auto_cross_check_disagreement_with_mock_nix_prefetch_git(nix, git_project, mock_nix_prefetch_git,
                                                                   monkeypatch):
    prefetch(config=git_project, via="python")
    before = (git_project.parent / "pylmserv.lock").read_bytes()
    monkeypatch.setenv("MOCK_WRONG_HASH", Hash.of_bytes(b"wrong").sri)
    with pytest.raises(VerificationError, match="nix-prefetch-git says"):
        prefetch(config=git_project, via="auto", refresh=True)
    assert (git_project.parent / "pylmserv.lock").read_bytes() == before


def test_nix_backend_without_nix_prefetch_git_names_the_tool(git_project, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # git yes; nix-prefetch-git is not installed here
    if Path("/usr/bin/nix-prefetch-git").exists():
        pytest.skip("a real nix-prefetch-git is installed")
    with pytest.raises(ToolMissingError, match="nix-prefetch-git is not on PATH"):
        prefetch(config=git_project, via="nix")
    # auto still works: python alone when the nix tool for git sources is absent
    assert prefetch(config=git_project, via="auto").written


@pytest.mark.nix
def test_nix_backend_url_matches_python(nix, tmp_path, http_dir):
    www, base = http_dir
    (www / "f.bin").write_bytes(os.urandom(10000))
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(f'[models.f]\nurl = "{base}/f.bin"\n')
    prefetch(config=cfg, via="nix")
    entry = load_lock(tmp_path / "pylmserv.lock").models["f"]
    assert entry.hash == Hash.of_bytes((www / "f.bin").read_bytes()) and entry.size == 10000
    out = subprocess.run(["nix", "hash", "file", str(www / "f.bin")], capture_output=True, text=True, check=True)
    assert entry.hash == Hash.parse(out.stdout.strip())


def test_auto_keeps_python_result_when_nix_tool_is_broken_with_mock_nix_prefetch_url(tmp_path, http_dir,
                                                                                   monkeypatch, caplog):
    """MOCK nix-prefetch-url that fails like a Nix without a usable store; auto warns, does not fail."""
    www, base = http_dir
    (www / "f.bin").write_bytes(b"payload")
    bindir = tmp_path / "mockbin"
    bindir.mkdir()
    (bindir / "nix-prefetch-url").write_text("#!/bin/sh\necho \"error: cannot open connection to remote store 'daemon'\" >&2\nexit 1\n")
    (bindir / "nix-prefetch-url").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(f'[models.f]\nurl = "{base}/f.bin"\n')
    import logging
    logger = logging.getLogger("pylmserv.prefetch")
    logger.addHandler(caplog.handler)  # works even if the CLI set propagate=False in this process
    try:
        prefetch(config=cfg, via="auto")
    finally:
        logger.removeHandler(caplog.handler)
    assert load_lock(tmp_path / "pylmserv.lock").models["f"].hash == Hash.of_bytes(b"payload")
    assert "not cross-checked" in caplog.text and "remote store" in caplog.text
    with pytest.raises(NetworkError, match="nix-prefetch-url failed"):  # --via nix reports it
        prefetch(config=cfg, via="nix", refresh=True)
