"""Backend python: download / clone in-process, unpack with Nix semantics, hash."""
from __future__ import annotations

from pathlib import Path

from ...core.archive import extract
from ...core.fsutil import temp_dir
from ...core.nar import nar_hash
from ...store.trees import download
from ...transfer import git as gitops
from .base import Fetch, Hashed


def hash_fetch(fetch: Fetch, work: Path) -> Hashed:
    with temp_dir(prefix="py.", dir=work) as tmp:  # an unpacked tree may be 1,000 levels deep
        if fetch.kind == "git":
            tree = gitops.checkout(fetch.url, fetch.rev, tmp / "checkout", submodules=fetch.submodules)
            return Hashed(nar_hash(tree), fetcher="builtins.fetchGit")
        h, size = download(fetch.url, tmp / "download", headers=fetch.headers, tmp_dir=tmp)
        if fetch.kind == "file":
            return Hashed(h, size)
        tree = extract(tmp / "download", tmp / "tree", policy="tar", strip_single_root=True)
        return Hashed(nar_hash(tree))
