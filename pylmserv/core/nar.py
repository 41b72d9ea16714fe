"""Streaming NAR serialiser (Nix ARchive), exact to Nix's format.

Used to compute the hash Nix gives a tree (`nix hash path`, fetchzip/fetchFromGitHub
narHash). The stream is one sequence (one hash), but reading it need not be: the walk
(this thread) assembles the stream in order, reading file contents straight into
reused buffers of SEGMENT bytes, and one writer thread hands each full buffer to
`write` (hashlib releases the GIL on large buffers, so hashing overlaps the walk and
the reads on a machine with two cores or more, where Nix does all three on one).
Memory stays bounded: SEGMENTS buffers in all.

Rules (from Nix's archive.cc): entries sorted by raw name bytes; a file is executable
iff the owner-exec bit is set; symlinks are never followed, also at the root; every
string is a u64 little-endian length, the bytes, then zero padding to 8.
"""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import stat
import struct
import threading
from collections.abc import Callable

from .errors import NarError, UsageError  # noqa: F401 - NarError re-exported
from .hashing import Hash, file_hash


_ZEROS = bytes(8)
SEGMENT = 1 << 20  # the stream is assembled and written in buffers of this size
SEGMENTS = 32  # buffers in all: the most the walk is ahead of the writer (deep enough that the
# hash, the slower side, keeps busy through runs of small files: 8 left it idle ~20 % of the time)


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


_REG_HEAD = _FILE_HEAD + _S["contents"]
_EXE_HEAD = _FILE_HEAD + _EXEC + _S["contents"]
_CLOSE = _S[")"]
_NODE = _S["node"]
_PACK = struct.Struct("<Q").pack
_IFMT, _IFREG, _IFDIR, _IFLNK = stat.S_IFMT(0o170000), stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
_PENDING_MAX = 1 << 16  # headers held back to be put with the next file's (bounded)


def dump(path: "str | bytes | os.PathLike[str]", write: Callable[[bytes], object]) -> None:
    """Serialise `path` as a NAR, calling `write` (from one thread, in order) with
    successive chunks: memoryviews valid only during the call (hashlib and io copy them).

    Iterative (an explicit stack of open directories), so a tree of any depth is as
    fine as it is for Nix, which handles thousands of levels. The small strings between
    two files' contents are gathered and put once (one call, not one per token)."""
    with _Stream(write) as out:
        stack: list = []  # (directory path, iterator over its sorted entry names)
        pend = _node(os.fsencode(path), _S["nix-archive-1"], out, stack)
        while stack:
            directory, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                pend += _CLOSE  # the directory node
                if stack:
                    pend += _CLOSE  # the entry that held it in its parent
                continue
            depth = len(stack)
            pend = _node(directory + b"/" + name, pend + _ENTRY_HEAD + _str(name) + _NODE, out, stack)
            if len(stack) == depth:  # not a directory: its entry ends here
                pend += _CLOSE
        out.put(pend)


def _node(path: bytes, pend: bytes, out: "_Stream", stack: list) -> bytes:
    """Lay out one node after the bytes `pend`; returns what is still to be put. A
    directory is only opened (pushed on `stack`)."""
    try:
        st = os.lstat(path)
        mode = st.st_mode
        kind = mode & _IFMT
        if kind == _IFREG:
            size = st.st_size
            out.put(pend + (_EXE_HEAD if mode & stat.S_IXUSR else _REG_HEAD) + _PACK(size))
            out.file(path, size)
            return _ZEROS[: (-size) % 8] + _CLOSE
        if len(pend) > _PENDING_MAX:
            out.put(pend)
            pend = b""
        if kind == _IFDIR:
            with os.scandir(path) as it:
                names = sorted([e.name for e in it])
            stack.append((path, iter(names)))
            return pend + _DIR_HEAD
        if kind == _IFLNK:
            return pend + _LINK_HEAD + _str(os.readlink(path)) + _CLOSE
    except OSError as exc:
        raise _os_error(path, exc) from None
    raise NarError(f"cannot put {os.fsdecode(path)!r} in a NAR: not a file, directory or symlink",
                   hint="Remove sockets, fifos and device files from the tree first.")


def _os_error(path: bytes, exc: OSError) -> BaseException:
    if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES, errno.EPERM):
        return NarError(f"cannot read {_short(path)} for its NAR hash: {exc.strerror}",
                        hint="Check the tree's permissions; paths longer than the system allows "
                             "cannot be read.")
    return exc


class _Stream:
    """The NAR stream, assembled in order by the walking thread into SEGMENT-sized
    buffers (headers copied in, file contents read straight into them) and written by
    one writer thread, which hands each buffer back for reuse once it is written."""

    def __init__(self, write: Callable[[memoryview], object]):
        self.write = write
        self.free: "queue.SimpleQueue" = queue.SimpleQueue()  # written buffers, for reuse
        self.full: "queue.SimpleQueue" = queue.SimpleQueue()  # (buffer, length) to write, in order
        self.made = 1
        self.buf = bytearray(SEGMENT)
        self.view = memoryview(self.buf)
        self.n = 0
        self.error: BaseException | None = None
        self.writer = threading.Thread(target=self._write_loop, name="nar-write", daemon=True)
        self.writer.start()

    def put(self, data: bytes) -> None:
        n = len(data)
        if self.n + n > SEGMENT:
            self._hand_over()
            if n > SEGMENT:  # a symlink target longer than a segment: unheard of, but valid
                self.full.put((bytearray(data), n))
                return
        self.view[self.n:self.n + n] = data
        self.n += n

    def file(self, path: bytes, size: int) -> None:
        """The file's bytes, read into the stream; it must still have `size` bytes."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _os_error(path, exc) from None
        got = 0
        try:
            while True:
                if self.n == SEGMENT:
                    self._hand_over()
                # One byte more than is left: a short read then proves the end (a regular
                # file reads short only at its end), so most files take one read, not two;
                # a file that grew fills that byte and is refused below.
                want = min(SEGMENT - self.n, size - got + 1)
                k = os.readv(fd, [self.view[self.n:self.n + want]])
                if not k:
                    break
                self.n += k
                got += k
                if got > size or (k < want and got == size):
                    break
        finally:
            os.close(fd)
        if got != size:
            raise NarError(f"{os.fsdecode(path)!r} changed size while being hashed",
                           hint="Hash it again when it is not being written.")

    def _hand_over(self) -> None:
        if self.error is not None:
            raise self.error
        self.full.put((self.buf, self.n))
        try:
            self.buf = self.free.get_nowait()
        except queue.Empty:
            if self.made < SEGMENTS:
                self.made += 1
                self.buf = bytearray(SEGMENT)
            else:
                self.buf = self._wait_free()
        self.view = memoryview(self.buf)
        self.n = 0

    def _wait_free(self) -> bytearray:
        while True:
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                if self.error is not None:
                    raise self.error from None

    def _write_loop(self) -> None:
        while True:
            item = self.full.get()
            if item is None:
                return
            buf, n = item
            if self.error is None:
                try:
                    with memoryview(buf) as view:
                        self.write(view[:n])
                except BaseException as exc:  # the walk stops at its next hand-over
                    self.error = exc
            self.free.put(buf)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None and self.n and self.error is None:
            self.full.put((self.buf, self.n))
        self.full.put(None)
        self.writer.join()
        if kind is None and self.error is not None:
            raise self.error
        return False


def _short(path: bytes) -> str:
    text = os.fsdecode(path)
    return repr(text) if len(text) <= 200 else repr(text[:80] + " ... " + text[-80:])


def nar_hash(path: "str | bytes | os.PathLike[str]", algo: str = "sha256") -> Hash:
    """The NAR hash of a path (what `nix hash path` prints)."""
    h = hashlib.new(algo)
    dump(path, h.update)
    return Hash.from_hashlib(h)


def default_mode(path: "str | bytes | os.PathLike[str]") -> str:
    """nar for directories and symlinks, flat for regular files (as the CLI defaults)."""
    st = os.lstat(path)
    return "flat" if stat.S_ISREG(st.st_mode) else "nar"


def hash_path(path: "str | bytes | os.PathLike[str]", mode: str | None = None, algo: str = "sha256") -> Hash:
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
