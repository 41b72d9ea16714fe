"""git: resolve refs with `git ls-remote`, check out a rev (with submodules) without .git.

The checkout equals what builtins.fetchGit { submodules = true; } and nixpkgs' fetchgit
hash: the worktree at `rev` with every entry named `.git` removed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

from ...core.errors import NetworkError, ToolMissingError, UsageError
from ..drift import reusable
from ..lock import GitPin
from . import Fetch, hash_fetch

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
TIMEOUT = 600


def _git(args: List[str], cwd: Path | None = None, timeout: int = TIMEOUT) -> str:
    exe = shutil.which("git")
    if exe is None:
        raise ToolMissingError("git is not installed", hint="Install git (apt-get install git).")
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true")
    cmd = [exe, "-c", "core.autocrlf=false", "-c", "advice.detachedHead=false", *args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise NetworkError(f"git {args[0]} timed out after {timeout}s", hint="Check the network and the git URL.") from None
    if proc.returncode != 0:
        raise GitError(args, proc.stderr)
    return proc.stdout


class GitError(NetworkError):
    def __init__(self, args: List[str], stderr: str):
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith(("fatal:", "error:"))), lines[-1] if lines else "")
        super().__init__(f"git {args[0]} failed: {last}", hint="Check the git URL, the ref and your network access.")
        self.stderr = stderr


def ls_remote(url: str) -> Dict[str, str]:
    """ref name -> sha, including peeled tags (`refs/tags/X^{}`) and HEAD."""
    out = _git(["ls-remote", "--", url], timeout=120)
    refs: Dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        if name:
            refs[name.strip()] = sha.strip()
    return refs


def resolve_ref(url: str, ref: str) -> str:
    """A tag (peeled to its commit), branch, full ref name, HEAD or full SHA -> commit SHA."""
    if SHA_RE.match(ref):
        return ref
    refs = ls_remote(url)
    for name in (f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", f"refs/heads/{ref}", f"{ref}^{{}}", ref):
        if name in refs:
            return refs[name]
    raise UsageError(f"ref {ref!r} not found in {url}",
                     hint="Fix `ref` in pylmserv.toml: a tag, a branch or a full 40-character commit SHA "
                          "(`git ls-remote URL` lists them).")


def checkout(url: str, rev: str, dest: Path, submodules: bool = False) -> Path:
    """The tree of `rev` of `url` in `dest` (new), hashed the way builtins.fetchGit does:
    with submodules, a checkout (submodules recursively) minus every `.git`; without,
    `git archive` of the commit (Nix 2.8 exports it so, so export-ignore and export-subst
    in .gitattributes apply; nixpkgs' fetchgit would keep those files)."""
    repo = dest.with_name(dest.name + ".repo")
    repo.mkdir(parents=True)
    try:
        _git(["init", "-q", str(repo)])
        _git(["remote", "add", "origin", url], cwd=repo)  # relative submodule URLs resolve against it
        try:
            _git(["fetch", "-q", "--depth", "1", "origin", rev], cwd=repo)
            target = "FETCH_HEAD"
        except GitError:
            # Servers that refuse fetching a bare SHA (or dumb HTTP): fetch every branch and tag.
            _git(["fetch", "-q", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"], cwd=repo)
            target = rev
        commit = _git(["rev-parse", "--verify", f"{target}^{{commit}}"], cwd=repo).strip()
        if SHA_RE.match(rev) and commit != rev:
            raise UsageError(f"{url}: fetched {commit} but the lock says {rev}")
        if submodules:
            _git(["checkout", "-q", commit], cwd=repo)
            _git(["submodule", "update", "-q", "--init", "--recursive"], cwd=repo)
            strip_dot_git(repo)
            os.replace(repo, dest)
        else:
            from ...core.archive import extract

            tar = repo / ".git" / "export.tar"
            _git(["archive", "--format=tar", "-o", str(tar), commit], cwd=repo)
            extract(tar, dest, policy="tar")
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    return dest


def strip_dot_git(root: Path) -> None:
    """Remove every entry named .git (dirs in the top repo, files in submodules)."""
    for dirpath, dirnames, filenames in os.walk(root):
        if ".git" in dirnames:
            dirnames.remove(".git")
            shutil.rmtree(os.path.join(dirpath, ".git"))
        if ".git" in filenames:
            os.unlink(os.path.join(dirpath, ".git"))


def fetcher_for(via: str) -> str:
    """The Nix fetcher whose tree a backend hashes for a git pin."""
    return "fetchgit" if via == "nix" else "builtins.fetchGit"


def resolve(spec, locked, opts):
    """[sources.NAME] type = "git": commit from ls-remote, NAR hash of the checkout."""
    rev = resolve_ref(spec.url, spec.ref)
    ident = dict(url=spec.url, git_url=spec.url, rev=rev, submodules=spec.submodules, fetcher=fetcher_for(opts.via))
    common = dict(kind="sources", name=spec.name, ref=spec.ref, **ident, **_meta(spec))
    if reusable(locked, GitPin, opts.refresh, **ident):
        return GitPin(hash=locked.hash, **common)
    got = hash_fetch(Fetch("git", spec.url, spec.name, rev=rev, submodules=spec.submodules), opts)
    return GitPin(hash=got.hash, **{**common, "fetcher": got.fetcher or common["fetcher"]})


def _meta(spec) -> dict:
    """Pass-through keys from the config that builders read (version, cosmocc)."""
    return {k: spec.meta[k] for k in ("version", "cosmocc") if k in spec.meta}
