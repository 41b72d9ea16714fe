"""Nothing outside PYLMSERV_HOME is ever deleted or written by a deleter: gc (and its dry
run), verify's quarantine, a download's stale partial, pack's stale temp files. Links are
planted at every level of the layout (store/layout.py), each pointing at sentinel files
outside the home that must come out of every run exactly as they went in; a home whose
own top-level directories are links (blobs/ on another disk, tmp/ on a shared scratch
directory) is the documented case: followed once, nothing below followed."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from pylmserv.app.gc import collect
from pylmserv.core.fsutil import remove_no_follow, stamped_name
from pylmserv.core.hashing import Hash
from pylmserv.store import roots
from pylmserv.store.integrity import verify_store
from tests.conftest import run_cli

HEX_A = "a" * 64
KEY = "0123456789abcdef"
NIX32 = "0" * 52


def snapshot(root: Path) -> dict:
    """Every entry below `root`: kind, mode, size, content digest or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                what = ("dir", stat.S_IMODE(st.st_mode))
            else:
                what = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
            out[str(p.relative_to(root))] = what
    return out


def outside_world(base: Path) -> Path:
    """A directory outside the home full of things a deleter must never touch."""
    out = base / "outside"
    for d in ("victim-dir/" + KEY, "victim-dir/sub", "scratch", "model-dir", "tree"):
        (out / d).mkdir(parents=True, exist_ok=True)
    (out / "victim-dir" / KEY / "llama-server").write_bytes(b"someone's binary")
    (out / "victim-dir" / "sub" / "data.bin").write_bytes(os.urandom(300))
    (out / "victim-file").write_text("keep me\n")
    (out / "victim.lock").write_text("a lock file with content\n")
    (out / "model-dir" / "m.gguf").write_bytes(b"GGUF" + bytes(40))
    (out / "tree" / "CMakeLists.txt").write_text("project(x)\n")
    ro = out / "read-only"
    ro.mkdir()
    (ro / "f").write_text("read-only\n")
    ro.chmod(0o555)
    return out


def plant(home: Path, out: Path) -> None:
    """A link at every level of the layout, each pointing outside."""
    def link(path: Path, target: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)

    link(home / "blobs" / "sha256" / HEX_A, out / "victim-file")  # a blob that is a link
    link(home / "blobs" / "sha256" / ("b" * 64), out / "gone")  # a dangling one
    link(home / "models" / "linked", out / "model-dir")  # a whole entry that is a link
    real_model = home / "models" / "real"
    real_model.mkdir(parents=True)
    (real_model / "m.gguf").write_bytes(b"GGUF" + bytes(10))
    link(real_model / "escape", out / "victim-dir")  # a link inside an entry
    link(home / "sources" / f"{NIX32}-linked", out / "tree")
    real_src = home / "sources" / f"{'1' * 52}-real"
    real_src.mkdir(parents=True)
    link(real_src / "sub", out / "victim-dir")
    link(home / "toolchains" / "cosmocc-4.0.2-abcdefabcdef", out / "victim-dir")
    link(home / "builds" / f"llama.cpp-cpu-{KEY}", out / "victim-dir")
    real_build = home / "builds" / f"llama.cpp-vulkan-{'f' * 16}"
    (real_build / "bin").mkdir(parents=True)
    link(real_build / "bin" / "outside", out / "victim-dir")
    link(real_build / "ro", out / "read-only")
    link(home / "bin" / "llama.cpp-cpu", out / "victim-dir")  # issue 18: gc deleted victim-dir/KEY
    link(home / "bin" / "llama.cpp-vulkan" / ("e" * 16), out / "victim-dir")
    link(home / "tmp" / f"{HEX_A}.lock", out / "victim.lock")  # a lock opened through would be truncated
    link(home / "tmp" / ("dl-" + "2" * 32 + ".part"), out / "victim-file")
    link(home / "tmp" / "stage.4000000.abcdef12.tmp", out / "victim-dir")
    link(home / "gcroots" / "procs" / "4000000-abcd.flock", out / "victim.lock")
    link(home / "gcroots" / "procs" / "4000001-abcd", out / "victim-dir")
    (home / "gcroots" / "procs" / "4000001-abcd.flock").write_bytes(b"")


@pytest.fixture
def planted(tmp_path, home):
    out = outside_world(tmp_path)
    plant(home, out)
    before = snapshot(out)
    yield home, out, before
    (out / "read-only").chmod(0o755)


def test_gc_dry_run_touches_nothing_and_gc_removes_only_links(planted):
    home, out, before = planted
    home_before = snapshot(home)
    dry = run_cli("gc", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert snapshot(home) == home_before  # nothing created, removed or truncated (no lock files either)
    assert snapshot(out) == before
    named = {Path(i["path"]).name for i in report["would_delete"]}
    assert {HEX_A, "linked", "llama.cpp-cpu", f"llama.cpp-cpu-{KEY}"} <= named

    done = run_cli("gc", "--json")
    assert done.returncode == 0, done.stderr
    assert snapshot(out) == before  # every sentinel, every mode, every byte
    left = snapshot(home)
    assert not any(v[0] == "link" and not k.endswith("current") for k, v in left.items()), left
    assert not (home / "bin" / "llama.cpp-cpu").exists() and not os.path.lexists(home / "bin" / "llama.cpp-cpu")
    assert (out / "victim-dir" / KEY / "llama-server").read_bytes() == b"someone's binary"


def test_remove_no_follow_on_every_shape(tmp_path):
    out = outside_world(tmp_path)
    before = snapshot(out)
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    os.symlink(out / "victim-dir", tree / "a" / "dirlink")
    os.symlink(out / "victim-file", tree / "a" / "b" / "filelink")
    os.symlink(out / "read-only", tree / "ro")
    (tree / "a" / "b" / "locked").mkdir()
    (tree / "a" / "b" / "locked" / "x").write_text("x")
    (tree / "a" / "b" / "locked").chmod(0o500)
    remove_no_follow(tree)
    assert not os.path.lexists(tree)
    root_link = tmp_path / "root-link"
    os.symlink(out / "victim-dir", root_link)
    remove_no_follow(root_link)  # a link given as the root: the link goes
    assert not os.path.lexists(root_link)
    remove_no_follow(tmp_path / "never-existed")
    assert snapshot(out) == before


def test_top_level_links_are_followed_once_and_foreign_files_stay(tmp_path, home):
    """tmp/ linked to a shared scratch directory: gc removes only what pylmserv names there.
    blobs/ on another filesystem (tmpfs): garbage still goes, by a rename beside itself."""
    scratch = tmp_path / "shared-scratch"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("a colleague's notes\n")
    (scratch / "build.lock").write_text("someone else's lock\n")
    (scratch / "job-42").mkdir()
    (scratch / "job-42" / "out.bin").write_bytes(os.urandom(100))
    (scratch / "cache.4000000.abcdef12.tmp.keep").write_text("not our pattern\n")
    (scratch / ".profile.4000000.tmp").write_text("someone's temp file\n")
    mine = "stage.4000000.abcdef12.tmp"
    (scratch / mine).write_bytes(b"left by a killed pylmserv")
    also_mine = "dl-" + "3" * 32 + ".state.json.4000000.tmp"
    (scratch / also_mine).write_text("{}")
    home.mkdir()
    os.symlink(scratch, home / "tmp")
    before = {k: v for k, v in snapshot(scratch).items() if k not in (mine, also_mine)}

    other_fs = Path("/dev/shm")
    if not other_fs.is_dir():
        pytest.skip("no tmpfs at /dev/shm for a second filesystem")
    disk2 = Path(os.environ.get("TMPDIR_SHM", other_fs)) / f"pylmserv-test-{os.getpid()}-{tmp_path.name}"
    (disk2 / "sha256").mkdir(parents=True)
    try:
        os.symlink(disk2, home / "blobs")
        data = b"an unrooted blob on another disk"
        blob = disk2 / "sha256" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        report = collect(home=home)
        assert {i.kind for i in report.garbage} == {"blob", "staging"}
        assert not blob.exists() and os.listdir(disk2 / "sha256") == []
        assert (home / "tmp").is_symlink() and (home / "blobs").is_symlink()  # the user's links stay
        ours = f"{blob.name}.lock"  # gc's lock on the blob it deleted: a pylmserv name
        assert {k: v for k, v in snapshot(scratch).items() if k != ours} == before
        assert not (scratch / mine).exists() and not (scratch / also_mine).exists()

        # verify on the other disk: a bad blob there cannot be renamed into quarantine/
        bad = disk2 / "sha256" / ("c" * 64)
        bad.write_bytes(b"rot")
        found = verify_store(home=home)
        (finding,) = found.bad
        assert finding.moved_to is None and "another filesystem" in finding.detail
        assert bad.read_bytes() == b"rot"
    finally:
        remove_no_follow(disk2)


def test_verify_quarantines_links_as_links(planted):
    home, out, before = planted
    proc = run_cli("verify", "--json")
    assert proc.returncode == 4, proc.stderr
    report = json.loads(proc.stdout)
    by_name = {(e["kind"], e["name"]): e for e in report["entries"]}
    assert by_name[("blob", HEX_A)]["status"] == "bad"
    assert by_name[("blob", "b" * 64)]["detail"] == "a dangling symlink"  # reported, not skipped
    assert by_name[("model", "real")]["status"] == "bad"
    assert by_name[("source", "real")]["status"] == "bad" and by_name[("source", "linked")]["status"] == "bad"
    assert snapshot(out) == before
    moved = [Path(e["moved_to"]) for e in report["entries"] if e["moved_to"]]
    assert moved and all(m.parent == home / "quarantine" for m in moved)
    assert os.readlink(next(m for m in moved if HEX_A in m.name)) == str(out / "victim-file")


def test_stale_partial_that_is_a_link_is_dropped_not_written_through(tmp_path, home, http_dir):
    from pylmserv.transfer.download import download

    www, base = http_dir
    data = os.urandom(50_000)
    (www / "m.gguf").write_bytes(data)
    h = Hash.of_bytes(data)
    out = outside_world(tmp_path)
    victim = out / "victim-big"
    victim.write_bytes(b"\0" * len(data))  # the size a resume would accept
    before = snapshot(out)
    tmp = home / "tmp"
    tmp.mkdir(parents=True)
    key = hashlib.sha256(h.hex.encode()).hexdigest()[:32]
    os.symlink(victim, tmp / f"dl-{key}.part")
    st = (www / "m.gguf").stat()  # the loopback server's ETag (tests/support/httpserver.py)
    etag = '"' + hashlib.sha1(f"{st.st_mtime_ns}-{st.st_size}".encode()).hexdigest()[:16] + '"'
    # a resume state that matches in every way: only the link tells it is not ours
    (tmp / f"dl-{key}.state.json").write_text(json.dumps({
        "version": 1, "url": f"{base}/m.gguf", "etag": etag, "validator": etag, "size": len(data),
        "parts": [[0, len(data), 0]]}))
    dest = home / "m.gguf"
    download(f"{base}/m.gguf", dest, expected=h, size=len(data), tmp_dir=tmp)
    assert dest.read_bytes() == data
    assert snapshot(out) == before


def test_pack_stale_temp_links_and_failure_leave_the_outside_alone(tmp_path):
    from pylmserv.core.apezip import write_archive
    from pylmserv.core.errors import PylmservError

    out = outside_world(tmp_path)
    before = snapshot(out)
    binary = tmp_path / "tiny.llamafile"
    with zipfile.ZipFile(binary, "w") as z:
        z.writestr("a.txt", "x")
    dest_dir = tmp_path / "dist"
    dest_dir.mkdir()
    output = dest_dir / "out.llamafile"
    # a temp name of a dead pack (pid 4000000 cannot exist), planted as links
    os.symlink(out / "victim-file", dest_dir / f".{output.name}.pylmserv-4000000-1.part")
    os.symlink(out / "victim-dir", dest_dir / f".{output.name}.pylmserv-4000001-1.part")
    with pytest.raises((PylmservError, OSError)):
        write_archive(binary, output, [("m.gguf", tmp_path / "missing.gguf")], [], 64, "full")
    assert snapshot(out) == before
    assert os.listdir(dest_dir) == []  # the stale links and its own temp file are gone
    assert stamped_name("x", "y").startswith("xpylmserv-")


def test_a_process_removes_its_own_root_record(tmp_path, home):
    from tests.conftest import run_cli as cli

    (tmp_path / "pylmserv.toml").write_text('[models.m]\nurl = "http://127.0.0.1:9/m.gguf"\n')
    from pylmserv.pins.config import Lock

    Lock(path=tmp_path / "pylmserv.lock").write()
    home.mkdir()
    code = ("from pylmserv.pins.config import load_project\n"
            f"load_project({str(tmp_path / 'pylmserv.toml')!r}).use_as_gc_root()\n")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYLMSERV_HOME=str(home)))
    assert proc.returncode == 0, proc.stderr
    assert roots.registered_locks(home) == [(tmp_path / "pylmserv.lock").resolve()]  # the persistent root
    assert os.listdir(home / "gcroots" / "procs") == []  # its per-process record went with it
    assert cli("gc", "--dry-run").returncode == 0


def test_a_process_record_swapped_or_filled_is_removed_without_following(tmp_path):
    """release_all's own deleter (no shutil on the up-to-date path): links in the record
    go as links, a record swapped for a link is not entered, a planted tree still goes."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "sentinel").write_text("keep")
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "a.lock").write_text("x")
    (rec / "to-outside").symlink_to(out)
    (rec / "to-file").symlink_to(out / "sentinel")
    roots._remove_flat(rec)
    assert not os.path.lexists(rec)
    # swapped for a link to a directory outside: the link goes, the target is not entered
    rec.symlink_to(out)
    roots._remove_flat(rec)
    assert not os.path.lexists(rec) and (out / "sentinel").read_text() == "keep"
    # a directory planted inside (with a link below it): the careful deleter, nothing outside followed
    (rec / "sub").mkdir(parents=True)
    (rec / "sub" / "to-outside").symlink_to(out)
    (rec / "f").write_text("y")
    roots._remove_flat(rec)
    assert not os.path.lexists(rec)
    assert sorted(os.listdir(out)) == ["sentinel"] and (out / "sentinel").read_text() == "keep"
    roots._remove_flat(rec)  # already gone: fine


def test_writers_never_write_through_a_planted_link(tmp_path, home):
    """A fetch into models/<name> and a build's install into bin/<engine>-<backend>/ where
    links were planted: the links go, the files land in the home, the outside is untouched."""
    from pylmserv.store.blobs import install_blob, link_named
    from tests.test_build_skeleton import ToyBuild

    out = outside_world(tmp_path)
    before = snapshot(out)
    (home / "models").mkdir(parents=True)
    os.symlink(out / "model-dir", home / "models" / "m")
    staged = tmp_path / "blob"
    staged.write_bytes(b"GGUF model bytes")
    h = Hash.of_bytes(b"GGUF model bytes")
    install_blob(staged, h, home)
    placed = link_named("m", h, "m.gguf", home=home)
    assert placed.parent == home / "models" / "m" and not placed.parent.is_symlink()
    key = ToyBuild().key
    (home / "bin").mkdir()
    os.symlink(out / "victim-dir", home / "bin" / "toy-cpu")
    result = ToyBuild().run()
    assert result.binaries["toy-bin"].read_text() == "built\n"
    assert not (home / "bin" / "toy-cpu").is_symlink() and (home / "bin" / "toy-cpu" / key / "toy-bin").is_file()
    assert snapshot(out) == before
