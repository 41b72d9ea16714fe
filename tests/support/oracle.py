"""Expected hashes computed without pylmserv: the standard library unpacks, the git CLI
checks out, and Nix (`nix hash path|file`, which adds nothing to the store) hashes.

Test support uses these where it used to ask pylmserv's own extract + nar_hash: a bug in
those would otherwise agree with itself.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from pylmserv.core.hashing import Hash

from .nixenv import nix_env


def nix_hash(path: Path, flat: bool = False) -> Hash:
    """`nix hash file` (flat) or `nix hash path` (NAR) of `path`, as an SRI Hash."""
    env = dict(os.environ, **nix_env())
    out = subprocess.run(["nix", "hash", "file" if flat else "path", "--type", "sha256", str(path)],
                         capture_output=True, text=True, check=True, env=env, timeout=600).stdout.strip()
    return Hash.parse(out)


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack a tar(.gz/.xz/.bz2) or zip with the standard library, dropping a single top
    directory as fetchzip/fetchTarball do; zip entries get their Unix modes back."""
    staging = dest.with_name(dest.name + ".unpack")
    staging.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                target = staging / info.filename
                mode = info.external_attr >> 16
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if stat.S_ISLNK(mode):
                    os.symlink(z.read(info).decode(), target)
                    continue
                target.write_bytes(z.read(info))
                if mode & 0o111:
                    target.chmod(0o755)
    else:
        with tarfile.open(archive) as t:
            t.extractall(staging, filter="tar")
    entries = list(staging.iterdir())
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() else staging
    os.replace(root, dest)
    shutil.rmtree(staging, ignore_errors=True)
    return dest


def git_tree(url: str, rev: str, dest: Path, submodules: bool) -> Path:
    """The tree builtins.fetchGit hashes: with submodules, a recursive checkout minus every
    `.git`; without, `git archive` of the commit (export-ignore applies)."""
    repo = dest.with_name(dest.name + ".repo")
    git = ["git", "-c", "protocol.file.allow=always"]
    subprocess.run(git + ["clone", "-q", url, str(repo)], check=True, timeout=300)
    subprocess.run(git + ["-C", str(repo), "checkout", "-q", rev], check=True, timeout=300)
    if submodules:
        subprocess.run(git + ["-C", str(repo), "submodule", "update", "-q", "--init", "--recursive"],
                       check=True, timeout=300)
        # every .git: the top repo's directory, the submodules' files
        subprocess.run(["find", str(repo), "-name", ".git", "-prune", "-exec", "rm", "-rf", "{}", "+"],
                       check=True, timeout=300)
        os.replace(repo, dest)
        return dest
    tar = dest.with_name(dest.name + ".tar")
    subprocess.run(git + ["-C", str(repo), "archive", "--format=tar", "-o", str(tar), rev], check=True, timeout=300)
    dest.mkdir(parents=True)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="tar")
    shutil.rmtree(repo)
    return dest


def download(url: str, out: Path) -> Path:
    """A plain GET (loopback test servers only)."""
    with urllib.request.urlopen(url, timeout=120) as resp, open(out, "wb") as f:
        shutil.copyfileobj(resp, f)
    return out
