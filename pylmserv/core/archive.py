"""Safe unpacking of .tar.{gz,xz,bz2,zst}, .tar and .zip, detected by magic bytes.

Two policies:
  data  for model archives: like tarfile's "data" filter. Refuses absolute member
        names, `..`, links that point outside the target (or absolute symlinks),
        devices and fifos.
  tar   for source trees that get NAR-hashed: what Nix's libarchive unpacker keeps.
        Symlinks are stored verbatim (absolute or dangling targets allowed), a
        leading "/" on a member name is taken relative to the target (Nix prefixes
        the target directory), `..` and writing through a symlink are refused.
Both: nothing is ever written outside `dest`; the archive is unpacked into a temp
directory beside `dest` and renamed into place, so a failure leaves nothing behind.

Permissions follow what a NAR records: a file is 0755 if the archive gives it the
owner-exec bit, else 0644; directories are 0755.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from .errors import UnsafeArchiveError, UsageError, VerificationError  # noqa: F401
from .fsutil import remove_no_follow, walk_no_follow

POLICIES = ("data", "tar")
_CHUNK = 1 << 20
_LINK_HINT = "Symlinks must stay inside the archive; extract with policy 'tar' only for trusted sources."
_MALICIOUS = "The archive is malformed or malicious; do not use it."
_MAX_HOPS = 40  # as the kernel's ELOOP limit

# (magic, offset, kind)
_MAGIC = (
    (b"\x1f\x8b", 0, "gz"),
    (b"\xfd7zXZ\x00", 0, "xz"),
    (b"BZh", 0, "bz2"),
    (b"\x28\xb5\x2f\xfd", 0, "zst"),
    (b"PK\x03\x04", 0, "zip"),
    (b"PK\x05\x06", 0, "zip"),  # empty zip
    (b"ustar", 257, "tar"),
)


def detect_format(path: Path) -> str:
    """gz | xz | bz2 | zst | zip | tar, from the first bytes (suffix only as a last resort)."""
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, offset, kind in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return kind
    name = Path(path).name.lower()
    if name.endswith(".tar"):
        return "tar"
    raise UsageError(f"{path}: not a supported archive (tar.gz, tar.xz, tar.bz2, tar.zst, tar, zip)",
                     hint="Check that the URL points at the archive itself, not an HTML page.")


def extract(archive: Path, dest: Path, *, policy: str = "data", strip_single_root: bool = False) -> Path:
    """Unpack `archive` so that `dest` holds its contents; returns `dest`.

    `dest` must not exist (an empty directory is replaced). With strip_single_root,
    exactly like `nix-prefetch-url --unpack` (Nix 2.8, verified in tests/test_archive.py):
    if the archive has exactly one top-level entry (directory, file or symlink), `dest`
    becomes that entry; otherwise `dest` is the directory of all entries. (For archives
    with one top-level directory this is also builtins.fetchTarball and nixpkgs' fetchzip;
    those two refuse several entries, and fetchzip wraps a lone file in a directory.)
    """
    if policy not in POLICIES:
        raise UsageError(f"unknown extraction policy {policy!r}", hint="Use 'data' or 'tar'.")
    archive, dest = Path(archive), Path(dest)
    if os.path.lexists(dest):
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            raise UsageError(f"{dest} already exists", hint="Extract into a new path.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    kind = detect_format(archive)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpack", dir=dest.parent))
    try:
        root = staging / "unpacked"
        root.mkdir()
        try:
            if kind == "zip":
                _extract_zip(archive, root, policy)
            else:
                _extract_tar(archive, kind, root, policy)
            if policy == "data":
                _check_symlinks_resolve(root, archive.name)
        except _decode_errors() as exc:
            raise VerificationError(f"{archive.name}: corrupt or truncated archive ({exc})",
                                    hint="Delete the file and download it again.") from None
        top = root
        if strip_single_root:
            entries = os.listdir(root)
            if len(entries) == 1:
                top = root / entries[0]
        os.replace(top, dest)
    finally:
        try:
            remove_no_follow(staging)  # iterative where a deep tree would overflow rmtree's recursion
        except OSError:
            pass
    return dest


def _decode_errors() -> tuple:
    import lzma
    import zlib

    import zstandard
    return (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


# -- member names -------------------------------------------------------------------

def _safe_relpath(name: str, policy: str, archive: str) -> Optional[str]:
    """Normalised relative member path, or None for the archive root itself."""
    if policy == "data" and (name.startswith("/") or (len(name) > 1 and name[1] == ":")):
        raise UnsafeArchiveError(f"{archive}: refusing absolute member path {name!r}",
                                 hint="The archive is malformed or malicious; do not use it.")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: refusing member path with '..': {name!r}",
                                 hint="The archive is malformed or malicious; do not use it.")
    return "/".join(parts) or None


def _prepare_parent(root: Path, rel: str, archive: str) -> Path:
    """Create the parent directories of `rel`; never pass through a symlink, never turn
    an earlier file member into a directory (libarchive, so Nix, refuses both)."""
    target = root
    parts = rel.split("/")
    for i, part in enumerate(parts[:-1]):
        target = target / part
        if target.is_symlink():
            raise UnsafeArchiveError(f"{archive}: refusing to extract {rel!r} through symlink {part!r}",
                                     hint=_MALICIOUS)
        if not target.is_dir():
            if os.path.lexists(target):
                where = "/".join(parts[:i + 1])
                raise UnsafeArchiveError(f"{archive}: {rel!r} needs directory {where!r}, but the archive made "
                                         "it a file (Nix refuses this archive too)", hint=_MALICIOUS)
            target.mkdir(mode=0o755)
    return target / parts[-1]


def _clear(path: Path, keep_dir: bool = False, archive: str = "") -> None:
    """Later members replace earlier ones of the same name (as tar and libarchive do); a
    directory only while empty (libarchive: "Can't replace existing directory with
    non-directory", so Nix refuses such an archive)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir() and not keep_dir:
        if any(path.iterdir()):
            raise UnsafeArchiveError(f"{archive}: a later member replaces the non-empty directory "
                                     f"{path.name!r} with a non-directory (Nix refuses this archive too)",
                                     hint=_MALICIOUS)
        path.rmdir()


def _check_link(rel: str, target: str, policy: str, archive: str) -> None:
    """Early, lexical refusal of an escaping symlink (data policy); the real check is
    _check_symlinks_resolve, once the whole tree exists."""
    if policy != "data":
        return
    if target.startswith("/"):
        raise UnsafeArchiveError(f"{archive}: refusing symlink {rel!r} -> absolute {target!r}", hint=_LINK_HINT)
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: refusing symlink {rel!r} -> {target!r} (outside the target)",
                                 hint=_LINK_HINT)


class _Escapes(Exception):
    pass


class _Loop(_Escapes):
    pass


def _resolve_in_tree(root: Path, rel: str) -> Optional[str]:
    """Resolve `rel` the way the kernel would, but against the tree under `root` only:
    symlinks in the tree are followed by reading them (never by the host), an absolute
    target or a `..` above the root raises _Escapes, a loop raises _Escapes too.
    Returns the resolved relative path, or None when a component does not exist."""
    pending = [p for p in rel.split("/") if p not in ("", ".")]
    pending.reverse()
    done: list = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if not done:
                raise _Escapes("above the archive root")
            done.pop()
            continue
        here = root.joinpath(*done, part)
        if here.is_symlink():
            hops += 1
            if hops > _MAX_HOPS:
                raise _Loop("a symlink loop")
            target = os.readlink(here)
            if target.startswith("/"):
                raise _Escapes(f"absolute symlink {'/'.join(done + [part])!r}")
            pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        if not os.path.lexists(here):
            return None
        done.append(part)
    return "/".join(done)


def _check_symlinks_resolve(root: Path, archive: str) -> None:
    """Data policy: every symlink of the finished tree, resolved through the tree's own
    links (chains included), stays inside it. Lexical checks alone miss `a -> .`,
    `b -> a/..` and friends."""
    for dirpath, dirnames, filenames in walk_no_follow(root):
        for name in filenames:  # links are among the files
            path = Path(dirpath, name)
            if not path.is_symlink():
                continue
            rel = path.relative_to(root).as_posix()
            try:
                _resolve_in_tree(root, rel)
            except _Loop:  # malformed rather than escaping: bad input, exit 2
                raise UsageError(f"{archive}: symlink {rel!r} -> {os.readlink(path)!r} is part of a symlink loop",
                                 hint="The archive is malformed: use another copy or ask its publisher to fix it.") from None
            except _Escapes as exc:
                raise UnsafeArchiveError(f"{archive}: refusing symlink {rel!r} -> {os.readlink(path)!r}: "
                                         f"it resolves outside the target ({exc})", hint=_LINK_HINT) from None


def _hardlink_source(root: Path, rel: str, linkname: str, policy: str, archive: str) -> Path:
    """The member a hard link names, looked up in the tree being built: every component
    must be a real directory of the tree and the last a regular file or a symlink member
    (libarchive then links the symlink itself); a path through a symlink member is
    refused (as Nix does: "cannot extract through symlink")."""
    linked = _safe_relpath(linkname, policy, archive)
    if linked is None:
        raise UnsafeArchiveError(f"{archive}: hard link {rel!r} -> {linkname!r} has no target", hint=_MALICIOUS)
    here = root
    for part in linked.split("/")[:-1]:
        here = here / part
        if here.is_symlink():
            raise UnsafeArchiveError(f"{archive}: refusing hard link {rel!r} -> {linkname!r} "
                                     f"through symlink {part!r}", hint=_MALICIOUS)
    here = here / linked.split("/")[-1]
    try:
        st = os.lstat(here)
    except OSError:
        st = None
    if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise UnsafeArchiveError(f"{archive}: hard link {rel!r} -> {linkname!r} has no target", hint=_MALICIOUS)
    return here


def _write_file(path: Path, src: BinaryIO, executable: bool) -> None:
    with open(path, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)
    os.chmod(path, 0o755 if executable else 0o644)


# -- tar ------------------------------------------------------------------------------

def _open_stream(archive: Path, kind: str) -> BinaryIO:
    if kind == "zst":
        import zstandard

        raw = open(archive, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=_CHUNK, closefd=True)
        return reader
    if kind == "gz":
        import gzip
        return gzip.open(archive, "rb")
    if kind == "xz":
        import lzma
        return lzma.open(archive, "rb")
    if kind == "bz2":
        import bz2
        return bz2.open(archive, "rb")
    return open(archive, "rb")


def _extract_tar(archive: Path, kind: str, root: Path, policy: str) -> None:
    import tarfile

    name = archive.name
    stream = _open_stream(archive, kind)
    try:
        # Stream mode ("r|"): one pass, constant memory, works for zstd too.
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                _extract_tar_member(tar, member, root, policy, name)
    except tarfile.TarError as exc:
        raise VerificationError(f"{name}: corrupt tar archive ({exc})",
                                hint="Delete the file and download it again.") from None
    finally:
        stream.close()


def _extract_tar_member(tar, member, root: Path, policy: str, archive: str) -> None:
    rel = _safe_relpath(member.name, policy, archive)
    if rel is None:
        return  # "./" itself
    if member.isdev() or member.isfifo():
        raise UnsafeArchiveError(f"{archive}: refusing special file {member.name!r} (device or fifo)",
                                 hint="Source and model archives contain only files, directories and links.")
    path = _prepare_parent(root, rel, archive)
    if member.isdir():
        _clear(path, keep_dir=True)
        path.mkdir(mode=0o755, exist_ok=True)
    elif member.issym():
        _check_link(rel, member.linkname, policy, archive)
        _clear(path, archive=archive)
        os.symlink(member.linkname, path)
    elif member.islnk():
        source = _hardlink_source(root, rel, member.linkname, policy, archive)
        if source == path:
            return  # a link to itself: the file is already there
        _clear(path, archive=archive)
        if source.is_symlink():  # a second symlink with the same target, never its referent
            target = os.readlink(source)
            _check_link(rel, target, policy, archive)
            os.symlink(target, path)
            return
        shutil.copyfile(source, path)
        # One inode, one mode: libarchive links, and the link's own header mode is not
        # applied (Nix: `b -> a` has a's mode whatever b's header says).
        os.chmod(path, os.stat(source).st_mode & 0o777)
    elif member.isreg():
        _clear(path, archive=archive)
        src = tar.extractfile(member)
        _write_file(path, src, bool(member.mode & stat.S_IXUSR))
    else:  # pragma: no cover - tarfile maps every other type to one of the above
        raise UnsafeArchiveError(f"{archive}: unsupported member type for {member.name!r}")


# -- zip ------------------------------------------------------------------------------

def _zip_members(zf) -> Iterator:
    for info in zf.infolist():
        yield info, (info.external_attr >> 16) & 0xFFFF


def _extract_zip(archive: Path, root: Path, policy: str) -> None:
    import zipfile

    name = archive.name
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise VerificationError(f"{name}: corrupt zip archive ({exc})", hint="Delete the file and download it again.") from None
    with zf:
        for info, mode in _zip_members(zf):
            if info.flag_bits & 0x1:
                raise UsageError(f"{name}: encrypted member {info.filename!r} is not supported")
            member = info.filename
            if "/" not in member and "\\" in member:
                # Made on Windows: backslash separators (libarchive converts a name
                # with no '/' at all; one with a '/' keeps its backslashes literally).
                member = member.replace("\\", "/")
            rel = _safe_relpath(member, policy, name)
            if rel is None:
                continue
            ftype = stat.S_IFMT(mode)
            if ftype and ftype not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                raise UnsafeArchiveError(f"{name}: refusing special file {info.filename!r}",
                                         hint="Source and model archives contain only files, directories and links.")
            path = _prepare_parent(root, rel, name)
            try:
                if member.endswith("/") or ftype == stat.S_IFDIR:
                    _clear(path, keep_dir=True)
                    path.mkdir(mode=0o755, exist_ok=True)
                elif ftype == stat.S_IFLNK:
                    target = zf.read(info).decode("utf-8", "surrogateescape")
                    _check_link(rel, target, policy, name)
                    _clear(path, archive=name)
                    os.symlink(target, path)
                else:
                    _clear(path, archive=name)
                    with zf.open(info) as src:
                        _write_file(path, src, bool(mode & stat.S_IXUSR))
            except zipfile.BadZipFile as exc:
                raise VerificationError(f"{name}: corrupt zip member {info.filename!r} ({exc})",
                                        hint="Delete the file and download it again.") from None
