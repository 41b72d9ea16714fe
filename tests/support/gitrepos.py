"""Real git repositories for tests (file:// URLs), with tags, branches and submodules."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Optional

# file:// submodules need protocol.file.allow=always (git >= 2.38.1); builtins.fetchGit and
# pylmserv both run git, so the tests put it in the environment rather than in a config file.
GIT_ENV = {
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "protocol.file.allow",
    "GIT_CONFIG_VALUE_0": "always",
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
}


def git(repo: Path, *args: str) -> str:
    env = dict(os.environ, **GIT_ENV)
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env, timeout=120).stdout.strip()


def make_repo(path: Path, files: Dict[str, object], message: str = "init") -> Path:
    """Create a repo with `files` (name -> bytes | str | ("exec", data) | ("link", target))."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    commit(path, files, message)
    return path


def commit(repo: Path, files: Dict[str, object], message: str = "change") -> str:
    for name, content in files.items():
        f = repo / name
        f.parent.mkdir(parents=True, exist_ok=True)
        if f.is_symlink() or f.exists():
            f.unlink()
        if isinstance(content, tuple) and content[0] == "link":
            os.symlink(content[1], f)
            continue
        executable = isinstance(content, tuple) and content[0] == "exec"
        data = content[1] if isinstance(content, tuple) else content
        f.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(f, 0o755 if executable else 0o644)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return head(repo)


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD")


def tag(repo: Path, name: str, annotated: bool = True, rev: Optional[str] = None) -> None:
    args = ["tag", "-a", name, "-m", name] if annotated else ["tag", name]
    git(repo, *args, *([rev] if rev else []))


def add_submodule(repo: Path, sub: Path, where: str) -> str:
    git(repo, "submodule", "add", "-q", sub.resolve().as_uri(), where)
    git(repo, "commit", "-q", "-m", f"add submodule {where}")
    return head(repo)


def uri(repo: Path) -> str:
    return repo.resolve().as_uri()


def publish_github(www: Path, owner: str, name: str, src: Path) -> None:
    """Lay out `src` under a static web root the way github.com serves it, so that
    PYLMSERV_GITHUB_URL=http://127.0.0.1:PORT works for both URLs pylmserv uses:
      OWNER/NAME.git                      bare repo over git's dumb HTTP protocol
      OWNER/NAME/archive/<commit>.tar.gz  `git archive` tarball with a NAME-<commit>/ root
    Call again after changing `src` to republish."""
    import shutil

    bare = www / owner / f"{name}.git"
    if bare.exists():
        shutil.rmtree(bare)
    bare.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(bare)], check=True, timeout=120,
                   env=dict(os.environ, **GIT_ENV))
    git(bare, "update-server-info")
    archive_dir = www / owner / name / "archive"
    archive_dir.mkdir(parents=True, exist_ok=True)
    for line in git(bare, "show-ref", "--dereference").splitlines():
        sha = line.split()[0]
        if git(bare, "cat-file", "-t", sha) != "commit":
            continue
        out = archive_dir / f"{sha}.tar.gz"
        if not out.exists():
            git(bare, "archive", "--format=tar.gz", f"--prefix={name}-{sha}/", "-o", str(out), sha)
