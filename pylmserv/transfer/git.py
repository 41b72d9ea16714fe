"""git transport: resolve refs with `git ls-remote`, check out a rev (with submodules) without .git.

The checkout equals what builtins.fetchGit { submodules = true; } and nixpkgs' fetchgit
hash: the worktree at `rev` with every entry named `.git` removed. The git resolver
(pins/resolvers/git.py) and the source store (store/trees.py) both use it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional

from ..core.archive import extract
from ..core.errors import GitError, NetworkError, UsageError
from ..core.fsutil import remove_no_follow, walk_no_follow
from ..core.proc import run_tool

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
TIMEOUT = 600


def _git(args: List[str], cwd: Optional[Path] = None, timeout: int = TIMEOUT) -> str:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true")
    cmd = ["git", "-c", "core.autocrlf=false", "-c", "advice.detachedHead=false", *args]
    proc = run_tool(cmd, timeout=timeout, cwd=cwd, env=env, what=f"git {args[0]}",
                    missing_hint="Install git (apt-get install git).",
                    timeout_error=NetworkError, timeout_hint="Check the network and the git URL.")
    if proc.returncode != 0:
        raise GitError(args, proc.stderr)
    return proc.stdout


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
            tar = repo / ".git" / "export.tar"
            _git(["archive", "--format=tar", "-o", str(tar), commit], cwd=repo)
            extract(tar, dest, policy="tar")
    finally:
        try:
            remove_no_follow(repo)
        except OSError:
            pass
    return dest


def strip_dot_git(root: Path) -> None:
    """Remove every entry named .git (dirs in the top repo, files in submodules)."""
    for dirpath, dirnames, filenames in walk_no_follow(root):  # iterative: any depth
        if ".git" in dirnames:
            dirnames.remove(".git")
            remove_no_follow(os.path.join(dirpath, ".git"))
        if ".git" in filenames:
            os.unlink(os.path.join(dirpath, ".git"))
