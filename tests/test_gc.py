"""`pylmserv gc`: roots are the locks used here, the `current` builds and what running
pylmserv processes hold; a store filled by real fetches over loopback, a real second
process holding locks."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.app.doctor import Machine, check_gc
from pylmserv.app.gc import collect
from pylmserv.core.errors import PylmservError
from pylmserv.core.hashing import Hash
from pylmserv.pins.config import Lock, LockEntry
from pylmserv.pins.prefetch import prefetch
from pylmserv.store import records, roots
from tests.conftest import run_cli


def make_project(directory: Path, base: str, names) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "pylmserv.toml"
    cfg.write_text("".join(f'[models.{n}]\nurl = "{base}/{n}.gguf"\n\n' for n in names))
    prefetch(config=cfg, via="python")
    return cfg


def fetch(cfg: Path, home: Path, *names: str) -> None:
    proc = run_cli("--config", cfg, "fetch", *names, env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr


def holder(home: Path, cfg: Path = None, locks=()) -> subprocess.Popen:
    """A second, real process: loads a project as fetch and build do (a gc root) and holds locks."""
    code = ("import sys, time\n"
            "from pylmserv.core.flock import FileLock\n"
            "from pylmserv.pins.config import load_project\n"
            f"cfg = {str(cfg)!r} if {cfg is not None!r} else None\n"
            "if cfg: load_project(cfg).use_as_gc_root()\n"
            f"held = [FileLock(p) for p in {[str(p) for p in locks]!r}]\n"
            "[h.acquire(timeout=0) for h in held]\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYLMSERV_HOME=str(home)))
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(30)


def blobs(home: Path):
    return sorted(p.name for p in (home / "blobs" / "sha256").iterdir())


@pytest.fixture
def served(http_dir):
    www, base = http_dir
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)  # a valid GGUF: no tensors, no metadata
    data = {n: header + os.urandom(3000 - len(header) + i * 1000) for i, n in enumerate("abcd")}
    for n, d in data.items():
        (www / f"{n}.gguf").write_bytes(d)
    return base, {n: hashlib.sha256(d).hexdigest() for n, d in data.items()}


def test_unrooted_blobs_entries_partials_go_and_rooted_stay(tmp_path, home, served):
    base, hexes = served
    p1 = make_project(tmp_path / "p1", base, ["a", "b"])
    p2 = make_project(tmp_path / "p2", base, ["c"])
    fetch(p1, home, "a", "b")
    fetch(p2, home, "c")
    assert blobs(home) == sorted(hexes[n] for n in "abc")
    (tmp_path / "p2" / "pylmserv.lock").unlink()  # a lock that is gone is no root any more
    p1.write_text(f'[models.a]\nurl = "{base}/a.gguf"\n')
    prefetch(config=p1, via="python")  # b leaves the lock
    tmp = home / "tmp"
    (tmp / ("dl-" + "0" * 32 + ".part")).write_bytes(b"x" * 5000)  # a download nobody runs any more
    (tmp / ("dl-" + "0" * 32 + ".state.json")).write_text("{}")
    (tmp / "stage.4000000.abcdef12.tmp").write_bytes(b"y" * 100)  # pid 4000000 cannot exist

    dry = run_cli("gc", "--dry-run", "--json", env={"PYLMSERV_HOME": str(home)})
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    gone = {(i["kind"], Path(i["path"]).name) for i in report["would_delete"]}
    assert gone == {("blob", hexes["b"]), ("blob", hexes["c"]), ("model", "b"), ("model", "c"),
                    ("partial", "dl-" + "0" * 32 + ".part"), ("partial", "dl-" + "0" * 32 + ".state.json"),
                    ("staging", "stage.4000000.abcdef12.tmp")}
    sizes = {n: 3000 + i * 1000 for i, n in enumerate("abcd")}
    manifests = sum((home / "models" / n / ".pylmserv.json").stat().st_size for n in "bc")
    # a model entry's file is a hardlink of its blob: counted once
    assert report["freed"] == sizes["b"] + sizes["c"] + manifests + 5000 + 2 + 100
    assert blobs(home) == sorted(hexes[n] for n in "abc")  # dry run deleted nothing

    done = run_cli("gc", env={"PYLMSERV_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert "freed" in done.stdout.splitlines()[-1]
    assert blobs(home) == [hexes["a"]]
    assert sorted(p.name for p in (home / "models").iterdir()) == ["a"]
    assert (home / "models" / "a" / "a.gguf").read_bytes() == (home / "blobs" / "sha256" / hexes["a"]).read_bytes()
    assert not any(p.name.startswith(("dl-", "stage", "gc-trash")) and not p.name.endswith(".lock")
                   for p in tmp.iterdir())
    assert roots.registered_locks(home) == [(tmp_path / "p1" / "pylmserv.lock").resolve()]
    again = json.loads(run_cli("gc", "--json", env={"PYLMSERV_HOME": str(home)}).stdout)
    assert again["deleted"] == [] and again["freed"] == 0


def test_live_process_keeps_what_it_holds(tmp_path, home, served):
    base, hexes = served
    p3 = make_project(tmp_path / "p3", base, ["d"])
    fetch(p3, home, "d")
    partial_lock = home / "tmp" / ("dl-" + "1" * 32 + ".lock")
    (home / "tmp" / ("dl-" + "1" * 32 + ".part")).write_bytes(b"z" * 700)
    proc = holder(home, cfg=p3, locks=[partial_lock])
    try:
        (tmp_path / "p3" / "pylmserv.lock").unlink()  # only the running process still roots d
        report = collect(home=home)
        assert blobs(home) == [hexes["d"]] and (home / "models" / "d").is_dir()
        assert {Path(i.path).name for i in report.in_use} == {"dl-" + "1" * 32 + ".part"}
        assert report.garbage == []
    finally:
        stop(proc)
    report = collect(home=home)  # the holder is dead: its flock went with it
    assert {i.kind for i in report.garbage} == {"blob", "model", "partial"}
    assert not (home / "blobs" / "sha256" / hexes["d"]).exists()
    assert list((home / "gcroots" / "procs").glob("*.flock")) == []


def _stamp(build: Path, source: str, created: float) -> None:
    (build / "bin").mkdir(parents=True)
    exe = build / "bin" / "llama-cli"
    exe.write_bytes(os.urandom(200))
    stamp = records.make_stamp({"source": source}, {"llama-cli": exe})
    records.write_stamp(build / records.STAMP_NAME, records.Stamp(stamp.key, stamp.inputs, stamp.outputs, created))


def test_builds_keep_current_and_newest_of_rooted_sources(tmp_path, home):
    rooted = Hash("sha256", bytes(range(32)))
    lock = Lock(path=tmp_path / "pylmserv.lock").with_entry(
        LockEntry("sources", "llama-cpp", "https://example.invalid/x.tar.gz", rooted, "nar"))
    lock.write()
    roots.register_lock(lock.path, home)
    keys = {n: f"{n:016x}" for n in range(1, 5)}
    for n, source, created in ((1, rooted.sri, 100.0), (2, rooted.sri, 200.0), (3, "sha256-other", 300.0)):
        _stamp(home / "builds" / f"llama.cpp-cpu-{keys[n]}", source, created)
        (home / "bin" / "llama.cpp-cpu" / keys[n]).mkdir(parents=True)
    os.symlink(keys[1], home / "bin" / "llama.cpp-cpu" / "current")  # the oldest is in use
    building = home / "builds" / f"llama.cpp-cpu-{keys[4]}"
    building.mkdir()
    proc = holder(home, locks=[Path(str(building) + ".lock")])  # a build running in another process
    try:
        report = collect(home=home, keep_builds=1, dry_run=True)
        assert {Path(i.path).name for i in report.garbage} == {f"llama.cpp-cpu-{keys[3]}", keys[3]}
        assert [Path(i.path).name for i in report.in_use] == [building.name]
        report = collect(home=home, keep_builds=0)
    finally:
        stop(proc)
    assert {Path(i.path).name for i in report.garbage} == {f"llama.cpp-cpu-{keys[n]}" for n in (2, 3)} | {keys[2], keys[3]}
    assert sorted(p.name for p in (home / "bin" / "llama.cpp-cpu").iterdir()) == sorted([keys[1], "current"])
    assert (home / "builds" / f"llama.cpp-cpu-{keys[1]}" / "bin" / "llama-cli").is_file()


def test_unreadable_root_stops_gc_and_doctor_reports(tmp_path, home, served):
    base, hexes = served
    p1 = make_project(tmp_path / "p1", base, ["a"])
    fetch(p1, home, "a")
    (home / "blobs" / "sha256" / ("f" * 64)).write_bytes(b"q" * 4096)  # unreferenced
    check = check_gc(Machine.current(store_root=home))
    assert "would free 4.0 KiB (1 item(s))" in check.detail
    (tmp_path / "p1" / "pylmserv.lock").write_text("version = 99\n")
    with pytest.raises(PylmservError, match="cannot read the root lock"):
        collect(home=home)
    assert blobs(home) == sorted([hexes["a"], "f" * 64])


def test_loading_a_project_creates_no_store_and_the_first_store_write_roots_it(tmp_path, home):
    from pylmserv.pins.config import load_project
    from pylmserv.store import layout

    (tmp_path / "pylmserv.toml").write_text('[models.m]\nurl = "https://example.invalid/m.gguf"\n')
    Lock(path=tmp_path / "pylmserv.lock").write()
    load_project(tmp_path / "pylmserv.toml").use_as_gc_root()
    assert not home.exists()  # rooting waits for the store: it never creates one
    layout.subdir("tmp")  # what a fetch or build does first
    assert roots.registered_locks(home) == [(tmp_path / "pylmserv.lock").resolve()]
    assert len(list((home / "gcroots" / "procs").glob("*.flock"))) == 1
