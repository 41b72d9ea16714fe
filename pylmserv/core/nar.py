"""Streaming NAR serialiser (Nix ARchive), exact to Nix's format.

Used to compute the hash Nix gives a tree (`nix hash path`, fetchzip/fetchFromGitHub
narHash). Memory stays constant: file contents are streamed in chunks.

Rules (from Nix's archive.cc): entries sorted by raw name bytes; a file is executable
iff the owner-exec bit is set; symlinks are never followed, also at the root; every
string is a u64 little-endian length, the bytes, then zero padding to 8.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from typing import Callable, Optional, Union

from .errors import NarError, UsageError  # noqa: F401 - NarError re-exported
from .hashing import Hash, file_hash


PathLike = Union[str, "os.PathLike[str]", bytes]
_ZEROS = bytes(8)
_CHUNK = 1 << 20


def _str(data: bytes) -> bytes:
    n = len(data)
    return struct.pack("<Q", n) + data + _ZEROS[: (-n) % 8]


_S = {s: _str(s.encode()) for s in (
    "nix-archive-1", "(", ")", "type", "regular", "directory", "symlink", "executable", "",
    "contents", "target", "entry", "name", "node")}
_FILE_HEAD = _S["("] + _S["type"] + _S["regular"]
_EXEC = _S["executable"] + _S[""]
_DIR_HEAD = _S["("] + _S["type"] + _S["directory"]
_LINK_HEAD = _S["("] + _S["type"] + _S["symlink"] + _S["target"]
_ENTRY_HEAD = _S["entry"] + _S["("] + _S["name"]


def dump(path: PathLike, write: Callable[[bytes], object]) -> None:
    """Serialise `path` as a NAR, calling `write` with successive byte chunks.

    Iterative (an explicit stack of open directories), so a tree of any depth is as
    fine as it is for Nix, which handles thousands of levels."""
    write(_S["nix-archive-1"])
    buf = bytearray(_CHUNK)
    stack: list = []  # (directory path, iterator over its sorted entry names)
    _node(os.fsencode(path), write, buf, stack)
    while stack:
        directory, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            write(_S[")"])  # the directory node
            if stack:
                write(_S[")"])  # the entry that held it in its parent
            continue
        write(_ENTRY_HEAD + _str(name) + _S["node"])
        if not _node(directory + b"/" + name, write, buf, stack):
            write(_S[")"])


def _node(path: bytes, write, buf: bytearray, stack: list) -> bool:
    """Write one node; a directory is only opened (pushed on `stack`): returns True."""
    try:
        st = os.lstat(path)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            head = _FILE_HEAD + (_EXEC if mode & stat.S_IXUSR else b"") + _S["contents"]
            size = st.st_size
            write(head + struct.pack("<Q", size))
            _copy_file(path, size, write, buf)
            write(_ZEROS[: (-size) % 8] + _S[")"])
            return False
        if stat.S_ISDIR(mode):
            write(_DIR_HEAD)
            with os.scandir(path) as it:
                names = sorted(e.name for e in it)
            stack.append((path, iter(names)))
            return True
        if stat.S_ISLNK(mode):
            write(_LINK_HEAD + _str(os.readlink(path)) + _S[")"])
            return False
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES, errno.EPERM):
            raise NarError(f"cannot read {_short(path)} for its NAR hash: {exc.strerror}",
                           hint="Check the tree's permissions; paths longer than the system allows "
                                "cannot be read.") from None
        raise
    raise NarError(f"cannot put {os.fsdecode(path)!r} in a NAR: not a file, directory or symlink",
                   hint="Remove sockets, fifos and device files from the tree first.")


def _short(path: bytes) -> str:
    text = os.fsdecode(path)
    return repr(text) if len(text) <= 200 else repr(text[:80] + " ... " + text[-80:])


def _copy_file(path: bytes, size: int, write, buf: bytearray) -> None:
    view = memoryview(buf)
    done = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            done += n
            write(view[:n])
    if done != size:
        raise NarError(f"{os.fsdecode(path)!r} changed size while being hashed", hint="Hash it again when it is not being written.")


def nar_hash(path: PathLike, algo: str = "sha256") -> Hash:
    """The NAR hash of a path (what `nix hash path` prints)."""
    h = hashlib.new(algo)
    dump(path, h.update)
    return Hash.from_hashlib(h)


def default_mode(path: PathLike) -> str:
    """nar for directories and symlinks, flat for regular files (as the CLI defaults)."""
    st = os.lstat(path)
    return "flat" if stat.S_ISREG(st.st_mode) else "nar"


def hash_path(path: PathLike, mode: Optional[str] = None, algo: str = "sha256") -> Hash:
    """`nix hash path` (mode nar) or `nix hash file` (mode flat) without Nix."""
    mode = mode or default_mode(path)
    if mode == "nar":
        return nar_hash(path, algo)
    if mode == "flat":
        if os.path.isdir(path):
            raise UsageError(f"{os.fsdecode(path)!r} is a directory: --mode flat hashes the bytes of one file",
                             hint="Use --mode nar (the default for directories), as `nix hash path` does.")
        return file_hash(path, algo)
    raise UsageError(f"unknown hash mode {mode!r}", hint="Use --mode nar or --mode flat.")
