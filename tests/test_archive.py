"""archive.extract: real archives; `nix-prefetch-url --unpack` is the oracle for the tar policy."""
from __future__ import annotations

import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import zstandard

from pylmserv.core.archive import detect_format, extract
from pylmserv.core.errors import UsageError, VerificationError
from pylmserv.core.hashing import Hash
from pylmserv.core.nar import nar_hash


# -- archive builders -----------------------------------------------------------------

def _tar_bytes(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    """members: list of (name, kind, payload, mode); kind in file|dir|sym|hard|fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, payload, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[kind]
            if kind in ("sym", "hard"):
                info.linkname = payload
            tar.addfile(info)
    return buf.getvalue()


def write_tar(path: Path, members, compression: str = "gz") -> Path:
    raw = _tar_bytes(members)
    if compression == "gz":
        import gzip
        data = gzip.compress(raw)
    elif compression == "xz":
        import lzma
        data = lzma.compress(raw)
    elif compression == "bz2":
        import bz2
        data = bz2.compress(raw)
    elif compression == "zst":
        data = zstandard.ZstdCompressor().compress(raw)
    else:
        data = raw
    path.write_bytes(data)
    return path


def write_zip(path: Path, members) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, kind, payload, mode in members:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" and not name.endswith("/") else ""))
            info.create_system = 3  # unix: external_attr carries st_mode
            ftype = {"file": 0o100000, "dir": 0o040000, "sym": 0o120000}[kind]
            info.external_attr = ((ftype | mode) << 16) | (0x10 if kind == "dir" else 0)
            data = payload.encode() if isinstance(payload, str) else payload
            zf.writestr(info, b"" if kind == "dir" else data)
    return path


RICH_TREE = [
    ("pkg-1.0", "dir", None, 0o755),
    ("pkg-1.0/README", "file", b"hello\n", 0o644),
    ("pkg-1.0/run.sh", "file", b"#!/bin/sh\necho hi\n", 0o755),
    ("pkg-1.0/group-exec-only", "file", b"x", 0o654),
    ("pkg-1.0/empty", "file", b"", 0o644),
    ("pkg-1.0/emptydir", "dir", None, 0o755),
    ("pkg-1.0/sub/deep/file.txt", "file", b"deep\n" * 100, 0o600),
    ("pkg-1.0/link-rel", "sym", "README", 0o777),
    ("pkg-1.0/link-abs", "sym", "/etc/passwd", 0o777),
    ("pkg-1.0/link-dangling", "sym", "nowhere/at/all", 0o777),
    ("pkg-1.0/hard", "hard", "pkg-1.0/run.sh", 0o755),
]
MULTI_ROOT = [
    ("a.txt", "file", b"a", 0o644),
    ("bin", "dir", None, 0o755),
    ("bin/tool", "file", b"\x7fELF", 0o755),
]


def nix_prefetch_unpack(path: Path) -> Hash:
    out = subprocess.run(["nix-prefetch-url", "--unpack", "--type", "sha256", path.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=True)
    return Hash.parse(out.stdout.strip().splitlines()[-1], algo="sha256")


# -- oracle tests -----------------------------------------------------------------------

@pytest.mark.nix
@pytest.mark.parametrize("compression", ["gz", "xz", "bz2", "zst"])
def test_tar_single_root_matches_nix_prefetch_url(nix, tmp_path, compression):
    archive = write_tar(tmp_path / f"pkg.tar.{compression}", RICH_TREE, compression)
    out = extract(archive, tmp_path / "out", policy="tar", strip_single_root=True)
    assert (out / "README").read_bytes() == b"hello\n"
    assert os.readlink(out / "link-abs") == "/etc/passwd"
    assert nar_hash(out) == nix_prefetch_unpack(archive)


@pytest.mark.nix
def test_tar_several_roots_not_stripped_matches_nix(nix, tmp_path):
    archive = write_tar(tmp_path / "multi.tar.gz", MULTI_ROOT)
    out = extract(archive, tmp_path / "out", policy="tar", strip_single_root=True)
    assert sorted(os.listdir(out)) == ["a.txt", "bin"]
    assert nar_hash(out) == nix_prefetch_unpack(archive)


@pytest.mark.nix
def test_tar_single_top_level_file_becomes_the_file(nix, tmp_path):
    archive = write_tar(tmp_path / "one.tar.gz", [("only.bin", "file", b"payload", 0o755)])
    out = extract(archive, tmp_path / "out", policy="tar", strip_single_root=True)
    assert out.is_file() and out.read_bytes() == b"payload"
    assert nar_hash(out) == nix_prefetch_unpack(archive)


@pytest.mark.nix
def test_tar_without_directory_entries_matches_nix(nix, tmp_path):
    # GitHub tarballs always list directories; many hand-made ones do not.
    members = [m for m in RICH_TREE if m[1] != "dir" or m[0].endswith("emptydir")]
    archive = write_tar(tmp_path / "nodirs.tar.gz", members)
    out = extract(archive, tmp_path / "out", policy="tar", strip_single_root=True)
    assert nar_hash(out) == nix_prefetch_unpack(archive)


@pytest.mark.nix
@pytest.mark.parametrize("members", [RICH_TREE[:-1], MULTI_ROOT], ids=["single-root", "several-roots"])
def test_zip_matches_nix_prefetch_url(nix, tmp_path, members):
    archive = write_zip(tmp_path / "pkg.zip", members)
    out = extract(archive, tmp_path / "out", policy="tar", strip_single_root=True)
    assert nar_hash(out) == nix_prefetch_unpack(archive)


def test_zip_keeps_exec_bits_and_symlinks(tmp_path):
    archive = write_zip(tmp_path / "t.zip", [("d", "dir", None, 0o755), ("d/x", "file", "#!", 0o755),
                                             ("d/y", "file", "y", 0o644), ("d/l", "sym", "y", 0o777)])
    out = extract(archive, tmp_path / "out", policy="data")
    assert os.stat(out / "d/x").st_mode & 0o100
    assert not os.stat(out / "d/y").st_mode & 0o100
    assert os.readlink(out / "d/l") == "y"


def test_detect_by_magic_not_suffix(tmp_path):
    archive = write_tar(tmp_path / "misnamed.zip", MULTI_ROOT, "xz")
    assert detect_format(archive) == "xz"
    out = extract(archive, tmp_path / "out")
    assert (out / "bin/tool").read_bytes() == b"\x7fELF"
    z = write_zip(tmp_path / "archive.bin", MULTI_ROOT)
    assert detect_format(z) == "zip"


def test_plain_tar_and_zstd_stream(tmp_path):
    big = os.urandom(3 << 20)
    archive = write_tar(tmp_path / "big.tar.zst", [("big.bin", "file", big, 0o644)], "zst")
    out = extract(archive, tmp_path / "out")
    assert (out / "big.bin").read_bytes() == big
    plain = write_tar(tmp_path / "p.tar", MULTI_ROOT, "none")
    assert detect_format(plain) == "tar"
    assert (extract(plain, tmp_path / "p") / "a.txt").read_bytes() == b"a"


# -- refusals (policy data and tar) -------------------------------------------------------

@pytest.mark.parametrize("policy", ["data", "tar"])
@pytest.mark.parametrize("members", [
    [("../evil", "file", b"x", 0o644)],
    [("a/../../evil", "file", b"x", 0o644)],
    [("link", "sym", "/tmp", 0o777), ("link/evil", "file", b"x", 0o644)],
    [("link", "sym", "..", 0o777), ("link/evil", "file", b"x", 0o644)],
    [("dev", "chr", None, 0o644)],
    [("pipe", "fifo", None, 0o644)],
], ids=["dotdot", "nested-dotdot", "through-abs-symlink", "through-rel-symlink", "device", "fifo"])
def test_unsafe_tar_refused_and_nothing_left(tmp_path, policy, members):
    archive = write_tar(tmp_path / "evil.tar.gz", members)
    (tmp_path / "dest").mkdir()
    with pytest.raises(VerificationError) as exc:
        extract(archive, tmp_path / "dest" / "out", policy=policy)
    assert "refusing" in exc.value.message
    assert os.listdir(tmp_path / "dest") == []  # no half-extracted tree, no temp dir
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("members", [
    [("/abs/evil", "file", b"x", 0o644)],
    [("l", "sym", "/etc/passwd", 0o777)],
    [("d/l", "sym", "../../x", 0o777)],
], ids=["absolute-name", "absolute-symlink", "symlink-escapes"])
def test_data_policy_refuses_what_tar_policy_keeps(tmp_path, members):
    archive = write_tar(tmp_path / "t.tar.gz", members)
    with pytest.raises(VerificationError):
        extract(archive, tmp_path / "data-out", policy="data")
    out = extract(archive, tmp_path / "tar-out", policy="tar")
    assert out.is_dir()
    assert not Path("/abs/evil").exists()
    if members[0][0].startswith("/"):
        assert (out / "abs/evil").read_bytes() == b"x"  # rooted in dest, as Nix does


@pytest.mark.parametrize("name", ["../evil", "/abs"])
def test_zip_unsafe_names_refused(tmp_path, name):
    archive = write_zip(tmp_path / "e.zip", [(name, "file", "x", 0o644)])
    with pytest.raises(VerificationError):
        extract(archive, tmp_path / "out", policy="data")
    assert not (tmp_path / "out").exists()


def test_corrupt_archive_is_a_one_line_verification_error(tmp_path):
    good = write_tar(tmp_path / "g.tar.gz", [("f", "file", os.urandom(200_000), 0o644)])
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(VerificationError) as exc:
        extract(bad, tmp_path / "out")
    assert "corrupt" in exc.value.message and "\n" not in exc.value.message
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_not_an_archive_and_existing_dest(tmp_path):
    page = tmp_path / "index.html"
    page.write_text("<html>not found</html>")
    with pytest.raises(UsageError, match="not a supported archive"):
        extract(page, tmp_path / "out")
    archive = write_tar(tmp_path / "m.tar.gz", MULTI_ROOT)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(UsageError, match="already exists"):
        extract(archive, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    assert (extract(archive, tmp_path / "empty") / "a.txt").exists()


@pytest.mark.nix
def test_dos_zip_without_unix_modes_matches_nix(nix, tmp_path):
    archive = tmp_path / "dos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in (("Dir/", b""), ("Dir/a.txt", b"a"), ("Dir/sub/b.exe", b"MZ"), ("Dir/implicit/c", b"c")):
            info = zipfile.ZipInfo(name)
            info.create_system = 0  # MS-DOS: no Unix mode in external_attr
            info.external_attr = 0x10 if name.endswith("/") else 0x20
            zf.writestr(info, data)
    out = extract(archive, tmp_path / "out", policy="tar", strip_single_root=True)
    assert (out / "implicit" / "c").read_bytes() == b"c"
    assert nar_hash(out) == nix_prefetch_unpack(archive)


@pytest.mark.nix
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_and_odd_names_match_nix(nix, tmp_path, fmt):
    long_dir = "pkg/" + "/".join(["d" * 40] * 4)
    members = [("pkg", "dir", None, 0o755), (f"{long_dir}/{'f' * 120}", "file", b"long", 0o644),
               ("pkg/sp ace & $(x)", "file", b"odd", 0o755), ("pkg/./dot/./x", "file", b"dot", 0o644),
               ("pkg/dup", "file", b"first", 0o644), ("pkg/dup", "file", b"second wins", 0o755)]
    if fmt == tarfile.USTAR_FORMAT:
        members = [m for m in members if len(m[0]) < 100]
    if fmt == tarfile.GNU_FORMAT:
        members.append(("pkg/caf\udce9-latin1", "file", b"latin-1 name", 0o644))  # raw byte 0xe9
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for name, kind, payload, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    archive = tmp_path / "odd.tar"
    archive.write_bytes(buf.getvalue())
    out = extract(archive, tmp_path / "out", policy="tar", strip_single_root=True)
    assert (out / "dup").read_bytes() == b"second wins"
    assert nar_hash(out) == nix_prefetch_unpack(archive)


SDIST = Path.home() / ".cache" / "pylmserv-tests" / "llama_cpp_python-0.3.36.tar.gz"


@pytest.mark.nix
@pytest.mark.slow
def test_real_llama_cpp_sdist_matches_nix_prefetch_url(nix, tmp_path):
    """The real llama.cpp source (vendored in the llama-cpp-python sdist), ~3700 files."""
    if not SDIST.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SDIST} missing; scripts/setup-dev.sh caches it")
        pytest.skip("llama-cpp-python sdist not cached")
    out = extract(SDIST, tmp_path / "src", policy="tar", strip_single_root=True)
    assert (out / "vendor" / "llama.cpp" / "CMakeLists.txt").exists()
    assert nar_hash(out) == nix_prefetch_unpack(SDIST)


# -- links resolved against the tree, never the host ---------------------------------------

_HOST_SECRET = Path("/etc/passwd")

# Each of these, extracted naively (links followed by the host), copies a host file into
# the tree or points a model file outside it.
_LINK_ATTACKS = {
    "hardlink-through-abs-symlink": [
        ("root", "dir", None, 0o755),
        ("root/sym", "sym", "/etc", 0o777),
        ("root/leak", "hard", "root/sym/passwd", 0o644)],
    "hardlink-through-rel-symlink-chain": [
        ("root", "dir", None, 0o755),
        ("root/a", "sym", ".", 0o777),
        ("root/b", "sym", "a/../..", 0o777),
        ("root/leak", "hard", "root/b/etc/passwd", 0o644)],
    "hardlink-through-inner-symlink": [
        ("root", "dir", None, 0o755),
        ("root/real/file", "file", b"inside", 0o644),
        ("root/alias", "sym", "real", 0o777),
        ("root/leak", "hard", "root/alias/file", 0o644)],
    "hardlink-to-directory": [
        ("root/d", "dir", None, 0o755),
        ("root/leak", "hard", "root/d", 0o644)],
}


@pytest.mark.parametrize("policy", ["data", "tar"])
@pytest.mark.parametrize("name", sorted(_LINK_ATTACKS))
def test_hard_links_never_resolve_through_symlinks(tmp_path, policy, name):
    archive = write_tar(tmp_path / "evil.tar.gz", _LINK_ATTACKS[name])
    (tmp_path / "dest").mkdir()
    with pytest.raises(VerificationError) as exc:
        extract(archive, tmp_path / "dest" / "out", policy=policy)
    assert "link" in exc.value.message
    assert os.listdir(tmp_path / "dest") == []


@pytest.mark.nix
@pytest.mark.parametrize("name", sorted(_LINK_ATTACKS))
def test_hard_link_refusals_agree_with_nix(nix, tmp_path, name):
    """Nix's unpacker refuses each of these too: a refusal is not a pin Nix would make."""
    archive = write_tar(tmp_path / "evil.tar.gz", _LINK_ATTACKS[name])
    run = subprocess.run(["nix-prefetch-url", "--unpack", "--type", "sha256", archive.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0, run.stdout


def test_a_hard_link_to_a_real_member_still_works(tmp_path):
    archive = write_tar(tmp_path / "ok.tar.gz", [
        ("root/d/file", "file", b"payload", 0o755),
        ("root/again", "hard", "root/d/file", 0o755),
        ("root/self", "file", b"s", 0o644),
        ("root/self", "hard", "root/self", 0o644)])
    for policy in ("data", "tar"):
        out = extract(archive, tmp_path / policy, policy=policy, strip_single_root=True)
        assert (out / "again").read_bytes() == b"payload"
        assert (out / "self").read_bytes() == b"s"


# Symlinks that look harmless one at a time and escape once their chain is resolved.
_ESCAPING_CHAINS = {
    "dot-then-dotdot": [("r/a", "sym", ".", 0o777), ("r/b", "sym", "a/../..", 0o777)],
    # (r/d stays empty until the symlink replaces it: Nix refuses replacing a full directory)
    "via-dir-link": [("r/d", "dir", None, 0o755), ("r/e", "dir", None, 0o755),
                     ("r/up", "sym", "d/e/../../..", 0o777),
                     ("r/d", "sym", ".", 0o777)],
    "two-hops": [("r/x", "sym", "y/..", 0o777), ("r/y", "sym", "z/../..", 0o777), ("r/z", "dir", None, 0o755),
                 ("r/f", "sym", "x/..", 0o777)],
    "loop": [("r/l1", "sym", "l2", 0o777), ("r/l2", "sym", "l1", 0o777)],
}


@pytest.mark.parametrize("fmt", ["tar", "zip"])
@pytest.mark.parametrize("name", sorted(_ESCAPING_CHAINS))
def test_data_policy_resolves_symlink_chains_against_the_tree(tmp_path, fmt, name):
    members = _ESCAPING_CHAINS[name]
    if fmt == "zip":
        archive = write_zip(tmp_path / "evil.zip", members)
    else:
        archive = write_tar(tmp_path / "evil.tar.gz", members)
    (tmp_path / "dest").mkdir()
    # A loop is malformed input (exit 2); an escape is a refused, unsafe archive (exit 4).
    with pytest.raises(UsageError if name == "loop" else VerificationError) as exc:
        extract(archive, tmp_path / "dest" / "out", policy="data")
    assert "symlink" in exc.value.message
    assert os.listdir(tmp_path / "dest") == []


def test_data_policy_keeps_links_that_stay_inside(tmp_path):
    archive = write_tar(tmp_path / "ok.tar.gz", [
        ("m/blobs/model.gguf", "file", b"GGUF", 0o644),
        ("m/a", "sym", ".", 0o777),
        ("m/latest", "sym", "a/blobs/model.gguf", 0o777),
        ("m/deep/up", "sym", "../a/a/blobs", 0o777),
        ("m/dangling", "sym", "missing/file", 0o777)])
    out = extract(archive, tmp_path / "out", policy="data", strip_single_root=True)
    assert (out / "latest").read_bytes() == b"GGUF"
    assert (out / "deep/up/model.gguf").read_bytes() == b"GGUF"


def test_no_host_file_reaches_a_source_tree(tmp_path):
    """The tar policy (source trees, NAR-hashed by prefetch and build) is what an attacker
    of a pinned source would use: host bytes must never land in the tree."""
    secret = _HOST_SECRET.read_bytes() if _HOST_SECRET.exists() else None
    for name, members in _LINK_ATTACKS.items():
        archive = write_tar(tmp_path / f"{name}.tar.gz", members)
        with pytest.raises(VerificationError):
            extract(archive, tmp_path / f"out-{name}", policy="tar", strip_single_root=True)
        for dirpath, _, files in os.walk(tmp_path):
            for f in files:
                p = Path(dirpath, f)
                if not p.is_symlink() and secret is not None and p.suffix != ".gz":
                    assert p.read_bytes() != secret, p


@pytest.mark.nix
def test_hard_link_to_a_symlink_member_is_that_symlink_as_nix_makes_it(nix, tmp_path):
    """libarchive links the symlink itself (no host file is read): the tree gets a second
    symlink with the same target, in the tar policy; the data policy refuses the target."""
    archive = write_tar(tmp_path / "t.tar.gz", [
        ("root/sym", "sym", "/etc/passwd", 0o777),
        ("root/rel", "sym", "sym", 0o777),
        ("root/again", "hard", "root/sym", 0o644),
        ("root/again-rel", "hard", "root/rel", 0o644)])
    out = extract(archive, tmp_path / "out", policy="tar", strip_single_root=True)
    assert os.readlink(out / "again") == "/etc/passwd"
    assert os.readlink(out / "again-rel") == "sym"
    assert nar_hash(out) == nix_prefetch_unpack(archive)
    with pytest.raises(VerificationError):
        extract(archive, tmp_path / "data", policy="data")


# -- Nix as the oracle for the edge cases of issue 10 ---------------------------------------

def _nix_unpack_or_refusal(path: Path):
    run = subprocess.run(["nix-prefetch-url", "--unpack", "--type", "sha256", path.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    return Hash.parse(run.stdout.strip().splitlines()[-1], algo="sha256") if run.returncode == 0 else None


def _ours_or_refusal(path: Path, dest: Path):
    try:
        return nar_hash(extract(path, dest, policy="tar", strip_single_root=True))
    except VerificationError:
        assert not dest.exists() and [p for p in dest.parent.iterdir() if p.name.startswith(".")] == []
        return None


def _windows_zip(path: Path, names, system=0) -> Path:
    """A zip as Windows tools write it: backslash separators, MS-DOS attributes only."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            info = zipfile.ZipInfo(name)
            info.create_system = system
            is_dir = name.endswith(("\\", "/"))
            info.external_attr = 0x10 if is_dir else 0x20
            zf.writestr(info, b"" if is_dir else name.encode() * 3)
    return path


WINDOWS_ZIPS = {
    "dirs-and-files": ["pkg\\", "pkg\\sub\\", "pkg\\sub\\a.txt", "pkg\\b.txt"],
    "no-dir-entries": ["pkg\\sub\\a.txt", "pkg\\b.txt"],
    "mixed-separators": ["pkg\\sub\\a.txt", "pkg/c.txt"],
    "backslash-in-a-unix-name": ["pkg/a\\b.txt", "pkg/c.txt"],
    "ntfs-made": ["pkg\\x\\y.txt"],
    "traversal": ["pkg\\..\\..\\evil.txt"],
    "file-then-dir": ["pkg\\x", "pkg\\x\\y"],
}


@pytest.mark.nix
@pytest.mark.parametrize("case", sorted(WINDOWS_ZIPS))
def test_windows_zips_match_nix(nix, tmp_path, case):
    archive = _windows_zip(tmp_path / f"{case}.zip", WINDOWS_ZIPS[case], system=11 if case == "ntfs-made" else 0)
    theirs = _nix_unpack_or_refusal(archive)
    ours = _ours_or_refusal(archive, tmp_path / "out" / "dest")
    assert ours == theirs, (ours, theirs)
    if case == "dirs-and-files":
        assert theirs is not None  # a real tree, not a pair of refusals


HARD_LINK_MODES = {
    "link-says-exec": [("r/a", "file", b"x", 0o644), ("r/b", "hard", "r/a", 0o755)],
    "link-says-plain": [("r/a", "file", b"x", 0o755), ("r/b", "hard", "r/a", 0o644)],
    "two-links-disagree": [("r/a", "file", b"x", 0o755), ("r/b", "hard", "r/a", 0o644), ("r/c", "hard", "r/a", 0o600)],
    "target-replaced-later": [("r/a", "file", b"x", 0o755), ("r/b", "hard", "r/a", 0o644), ("r/a", "file", b"new", 0o644)],
}


@pytest.mark.nix
@pytest.mark.parametrize("case", sorted(HARD_LINK_MODES))
def test_hard_link_mode_is_its_targets_as_nix_makes_it(nix, tmp_path, case):
    """One inode, one mode: a hard link's own header mode does not count."""
    archive = write_tar(tmp_path / "h.tar.gz", HARD_LINK_MODES[case])
    theirs = _nix_unpack_or_refusal(archive)
    assert theirs is not None
    assert _ours_or_refusal(archive, tmp_path / "out" / "dest") == theirs


SAME_NAME = {
    "tar-file-then-dir-entry": ("tar", [("r/x", "file", b"f", 0o644), ("r/x", "dir", None, 0o755),
                                        ("r/x/y", "file", b"y", 0o644)]),
    "tar-file-then-implicit-dir": ("tar", [("r/x", "file", b"f", 0o644), ("r/x/y", "file", b"y", 0o644)]),
    "tar-full-dir-then-file": ("tar", [("r/x", "dir", None, 0o755), ("r/x/y", "file", b"y", 0o644),
                                       ("r/x", "file", b"f", 0o644)]),
    "tar-empty-dir-then-file": ("tar", [("r/x", "dir", None, 0o755), ("r/x", "file", b"f", 0o644)]),
    "tar-full-dir-then-symlink": ("tar", [("r/x", "dir", None, 0o755), ("r/x/y", "file", b"y", 0o644),
                                          ("r/x", "sym", "y", 0o777)]),
    "tar-dir-twice": ("tar", [("r/x", "dir", None, 0o755), ("r/x/y", "file", b"y", 0o644), ("r/x", "dir", None, 0o700)]),
    "zip-file-then-dir": ("zip", [("r/x", "file", b"f", 0o644), ("r/x/y", "file", b"y", 0o644)]),
    "zip-dir-then-file": ("zip", [("r/x/y", "file", b"y", 0o644), ("r/x", "file", b"f", 0o644)]),
}


@pytest.mark.nix
@pytest.mark.parametrize("case", sorted(SAME_NAME))
def test_file_and_directory_of_one_name_match_nix_either_order(nix, tmp_path, case):
    kind, members = SAME_NAME[case]
    archive = (write_tar(tmp_path / "s.tar.gz", members) if kind == "tar"
               else write_zip(tmp_path / "s.zip", members))
    theirs = _nix_unpack_or_refusal(archive)
    assert _ours_or_refusal(archive, tmp_path / "out" / "dest") == theirs
