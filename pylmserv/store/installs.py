"""Installed binaries: copies of a build's outputs (and the shared libraries beside them)
under bin/<engine>-<backend>/<key>, or a user's --prefix, and the `current` link that names
the one in use. Stat calls when nothing changed: an up-to-date build re-installs for free.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from ..core.errors import UsageError


def shared_libs(build_dir: Path) -> List[Path]:
    """Libraries a shared/portable build puts beside the binaries (libggml*.so, backends)."""
    bindir = build_dir / "bin"
    pats = ("*.so", "*.so.*", "*.dylib", "*.dll")
    return sorted({p for pat in pats for p in bindir.glob(pat) if p.is_file()})


def _same_size_and_mtime(a: Path, b: Path) -> bool:
    """b (the installed copy) is a regular file like a: a link planted there never counts as
    installed (lstat), so it is replaced, and `current` never runs a file outside the home."""
    import stat

    try:
        sa, sb = a.stat(), b.lstat()
    except OSError:
        return False
    return stat.S_ISREG(sb.st_mode) and sa.st_size == sb.st_size and int(sa.st_mtime) == int(sb.st_mtime)


def _copy_atomic(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    import shutil  # lazy: ~3 ms an up-to-date `build` (only stat calls when unchanged) does not need

    if os.path.lexists(tmp):  # a leftover, or a link planted at the predictable name: never written through
        os.unlink(tmp) if not os.path.isdir(tmp) or os.path.islink(tmp) else os.rmdir(tmp)
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def real_dirs(base: Path, *parts: str) -> Path:
    """base/parts..., each part a real directory: a link planted in its place (not pylmserv's)
    is removed as a link, so nothing is installed through it outside the home. `base`
    itself (a layout directory such as bin/) may be a link: the user's choice."""
    path = Path(base)
    for part in parts:
        path = path / part
        if os.path.islink(path):
            os.unlink(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def install_files(binaries: Mapping[str, Path], bindir: Path, with_libs: Optional[Path] = None) -> Dict[str, Path]:
    """Copy built binaries (and shared libraries beside them) into `bindir`; unchanged files
    are left alone, so re-installing an up-to-date build is a handful of stat() calls."""
    bindir.mkdir(parents=True, exist_ok=True)
    out = {}
    files = [(name, Path(src)) for name, src in binaries.items()]
    files += [(None, lib) for lib in (shared_libs(with_libs.parent) if with_libs else [])]
    for name, src in files:
        dest = bindir / src.name
        if not _same_size_and_mtime(src, dest):
            _copy_atomic(src, dest)
        if name:
            out[name] = dest
    return out


def point_current(target: Path) -> Path:
    """Make `<target.parent>/current` a relative link to `target` (atomic replace)."""
    link = target.parent / "current"
    try:
        if os.readlink(link) == target.name:
            return link
    except OSError:
        pass
    if os.path.isdir(link) and not os.path.islink(link):  # os.replace cannot put a link over it
        raise UsageError(f"{link} is a directory, where pylmserv keeps the link to the build in use",
                         hint=f"Move that directory away (pylmserv never deletes it for you), then run the "
                              f"command again; the build itself is done: {target}.")
    tmp = target.parent / f".current.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target.name, tmp)
    os.replace(tmp, link)
    return link
