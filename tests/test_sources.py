"""sources.ensure_source: real loopback HTTP, real file:// git repos, real Nix as oracle."""
from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pylmserv.pins.config import LockEntry
from pylmserv.core.errors import NetworkError, VerificationError
from pylmserv.core.hashing import Hash
from pylmserv.core.nar import nar_hash
from pylmserv.store.trees import ensure_source, store_path
from tests.support import gitrepos
from tests.test_archive import RICH_TREE, write_tar, write_zip


def flat_entry(name, url, h, **extra) -> LockEntry:
    return LockEntry("sources", name, url, h, "flat", extra={"type": "url", "unpack": False, **extra})


def nar_entry(name, url, h, rev=None, **extra) -> LockEntry:
    return LockEntry("sources", name, url, h, "nar", rev=rev, extra=extra)


def test_flat_download_verified_then_idempotent_offline(home, http_dir):
    root, base = http_dir
    payload = os.urandom(300_000)
    write_zip(root / "tool.zip", [("bin/cc", "file", payload, 0o755)])
    h = Hash.of_bytes((root / "tool.zip").read_bytes())
    entry = flat_entry("tool", f"{base}/tool.zip", h)
    path = ensure_source(entry)
    assert path == home / "blobs" / "sha256" / h.hex
    assert path.read_bytes() == (root / "tool.zip").read_bytes()
    (root / "tool.zip").unlink()  # a second call must not need the network
    assert ensure_source(entry) == path


@pytest.mark.nix
def test_archive_tree_matches_nix_prefetch_url(home, http_dir, nix):
    root, base = http_dir
    write_tar(root / "pkg.tar.xz", RICH_TREE, "xz")
    out = subprocess.run(["nix-prefetch-url", "--unpack", f"{base}/pkg.tar.xz"], capture_output=True,
                         text=True, timeout=120, check=True)
    nix_hash = Hash.parse(out.stdout.strip().splitlines()[-1], algo="sha256")
    path = ensure_source(nar_entry("pkg", f"{base}/pkg.tar.xz", nix_hash, type="url", unpack=True))
    assert path == home / "sources" / f"{nix_hash.nix32}-pkg"
    assert (path / "run.sh").stat().st_mode & 0o100
    assert nar_hash(path) == nix_hash


def test_mismatch_names_expected_got_and_fix_and_stores_nothing(home, http_dir):
    root, base = http_dir
    write_tar(root / "pkg.tar.gz", RICH_TREE)
    wrong = Hash.of_bytes(b"not it")
    with pytest.raises(VerificationError) as exc:
        ensure_source(nar_entry("pkg", f"{base}/pkg.tar.gz", wrong, type="url", unpack=True))
    msg = exc.value.message
    assert wrong.sri in msg and "got sha256-" in msg
    assert "pylmserv prefetch --refresh pkg" in exc.value.hint
    assert not (home / "sources").exists() or os.listdir(home / "sources") == []
    assert [p for p in (home / "tmp").iterdir() if not p.name.endswith(".lock")] == []


def test_github_entry_uses_mirror_env(home, http_dir, monkeypatch):
    root, base = http_dir
    (root / "owner/repo/archive").mkdir(parents=True)
    write_tar(root / "owner/repo/archive/v1.tar.gz", RICH_TREE)
    expected = _tree_hash_via_extract(root / "owner/repo/archive/v1.tar.gz", home.parent)
    monkeypatch.setenv("PYLMSERV_GITHUB_URL", base)
    entry = nar_entry("repo", "https://github.com/owner/repo/archive/v1.tar.gz", expected, rev="v1",
                      type="github", owner="owner", repo="repo", submodules=False)
    assert nar_hash(ensure_source(entry)) == expected


def _tree_hash_via_extract(archive: Path, scratch: Path) -> Hash:
    from pylmserv.core.archive import extract
    return nar_hash(extract(archive, scratch / "oracle-tree", policy="tar", strip_single_root=True))


@pytest.mark.nix
def test_git_with_submodules_matches_builtins_fetchgit(home, tmp_path, nix, gitenv):
    sub = gitrepos.make_repo(tmp_path / "sub", {"lib.c": "int x;\n", "tool": ("exec", "#!/bin/sh\n")})
    top = gitrepos.make_repo(tmp_path / "top", {"main.c": "int main(){}\n", "link": ("link", "main.c"),
                                                "dir/abs": ("link", "/nonexistent")})
    rev = gitrepos.add_submodule(top, sub, "vendor/sub")
    expr = (f'(builtins.fetchGit {{ url = "{gitrepos.uri(top)}"; rev = "{rev}"; submodules = true; }}).narHash')
    out = subprocess.run(["nix", "eval", "--raw", "--expr", expr], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    nix_hash = Hash.parse(out.stdout.strip())
    entry = nar_entry("top", gitrepos.uri(top), nix_hash, rev=rev, type="git", submodules=True)
    path = ensure_source(entry)
    assert (path / "vendor/sub/lib.c").read_text() == "int x;\n"
    assert not (path / ".git").exists() and not (path / "vendor/sub/.git").exists()
    assert nar_hash(path) == nix_hash


def test_http_404_and_unreachable_are_network_errors(home, http_dir):
    _, base = http_dir
    with pytest.raises(NetworkError, match="HTTP 404"):
        ensure_source(flat_entry("gone", f"{base}/missing.zip", Hash.of_bytes(b"")))
    with pytest.raises(NetworkError, match="cannot reach"):
        ensure_source(flat_entry("down", "http://127.0.0.1:9/x.zip", Hash.of_bytes(b"")))


def test_concurrent_callers_get_one_verified_copy(home, http_dir):
    root, base = http_dir
    write_tar(root / "pkg.tar.gz", RICH_TREE)
    expected = _tree_hash_via_extract(root / "pkg.tar.gz", home.parent)
    entry = nar_entry("pkg", f"{base}/pkg.tar.gz", expected, type="url", unpack=True)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: ensure_source(entry), range(4)))
    assert len(set(paths)) == 1 and paths[0] == store_path(entry)
    assert os.listdir(home / "sources") == [paths[0].name]
    assert nar_hash(paths[0]) == expected


def test_concurrent_processes(home, http_dir, tmp_path):
    import sys
    root, base = http_dir
    write_tar(root / "pkg.tar.gz", RICH_TREE)
    expected = _tree_hash_via_extract(root / "pkg.tar.gz", tmp_path)
    code = ("import sys; from pylmserv.pins.config import LockEntry; from pylmserv.core.hashing import Hash;"
            "from pylmserv.store.trees import ensure_source;"
            f"e = LockEntry('sources', 'pkg', '{base}/pkg.tar.gz', Hash.parse('{expected.sri}'), 'nar',"
            " extra={'type': 'url', 'unpack': True}); print(ensure_source(e))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1 and nar_hash(Path(outs[0])) == expected


@pytest.mark.nix
@pytest.mark.parametrize("submodules", [False, True])
def test_git_export_ignore_follows_builtins_fetchgit(home, tmp_path, nix, gitenv, submodules):
    """Nix 2.8 exports a plain fetchGit with `git archive` (export-ignore applies) but checks
    out when submodules = true (it does not); pylmserv must give the same narHash both ways."""
    repo = gitrepos.make_repo(tmp_path / "r", {".gitattributes": "secret export-ignore\n", "secret": "s\n",
                                               "keep": ("exec", "k\n"), "l": ("link", "keep")})
    rev = gitrepos.head(repo)
    flag = "true" if submodules else "false"
    expr = f'(builtins.fetchGit {{ url = "{gitrepos.uri(repo)}"; rev = "{rev}"; submodules = {flag}; }}).narHash'
    out = subprocess.run(["nix", "eval", "--raw", "--expr", expr], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    nix_hash = Hash.parse(out.stdout.strip())
    path = ensure_source(nar_entry("r", gitrepos.uri(repo), nix_hash, rev=rev, type="git", submodules=submodules))
    assert (path / "secret").exists() == submodules
    assert nar_hash(path) == nix_hash


def test_lock_held_too_long_is_a_clean_error(home, http_dir, monkeypatch):
    from pylmserv.core.flock import FileLock

    import pylmserv.store.trees as sources
    from pylmserv.core.errors import PylmservError

    root, base = http_dir
    (root / "f.bin").write_bytes(b"x")
    entry = flat_entry("f", f"{base}/f.bin", Hash.of_bytes(b"x"))
    monkeypatch.setattr(sources, "LOCK_TIMEOUT", 0.2)
    holder = FileLock(str(home / "tmp" / f"{store_path(entry).name}.lock"))
    holder.acquire()
    try:
        with pytest.raises(PylmservError, match="another pylmserv process"):
            ensure_source(entry)
    finally:
        holder.release()
    assert ensure_source(entry).read_bytes() == b"x"
