"""The one build skeleton (pylmserv.builders.base) both engines run on: fast path, build
lock, the stamp read again under the lock, no stamp after a failure. A tiny engine whose
"compile" writes a file; the locks, stamps and installs are the real ones."""
from __future__ import annotations

import threading
import time

import pytest

from pylmserv.builders.base import BuildSkeleton, Compiled
from pylmserv.core.flock import FileLock
from pylmserv.builders.llamafile import LlamafileBuild
from pylmserv.builders import LlamaCppBuild
from pylmserv.store import records as stamps


class ToyBuild(BuildSkeleton):
    engine = "toy"

    def __init__(self, tag="x", fail=False, **kw):
        super().__init__(**kw)
        self.backend = "cpu"
        self.fail = fail
        self.calls = {"prepare": 0, "compile": 0}
        self._identify("cpu", {"engine": "toy", "tag": tag})

    def prepare(self):
        self.calls["prepare"] += 1
        return self.build_dir

    def compile(self, source):
        self.calls["compile"] += 1
        if self.fail:
            raise RuntimeError("compiler exploded")
        out = self.build_dir / "toy-bin"
        out.write_text("built\n")
        return Compiled({"toy-bin": out}, ("compiled",), ("toy --build",))


def test_both_engines_use_the_skeleton():
    assert issubclass(LlamaCppBuild, BuildSkeleton) and issubclass(LlamafileBuild, BuildSkeleton)
    for cls in (LlamaCppBuild, LlamafileBuild):  # no private copy of the pipeline left behind
        assert "run" not in vars(cls) and "finish" not in vars(cls) and "prefix_dir" not in vars(cls)


def test_build_then_fast_path_installs_and_points_current(home):
    first = ToyBuild()
    r1 = first.run()
    assert not r1.cache_hit and first.calls == {"prepare": 1, "compile": 1}
    assert r1.binaries["toy-bin"].read_text() == "built\n" and r1.current.resolve() == r1.prefix.resolve()
    second = ToyBuild()
    r2 = second.run()
    assert r2.cache_hit and second.calls == {"prepare": 0, "compile": 0}  # no preflight/fetch on the fast path
    assert r2.commands == ("toy --build",)
    assert ToyBuild(tag="y").key != first.key


def test_failed_compile_leaves_no_stamp(home):
    ok = ToyBuild()
    ok.run()
    broken = ToyBuild(force=True, fail=True)
    with pytest.raises(RuntimeError):
        broken.run()
    assert not broken.stamp_path.exists()  # the old stamp went first: nothing half-built looks done
    assert not ToyBuild().run().cache_hit


def test_stamp_read_again_under_the_lock(home):
    """Another process holds the build lock and finishes the same build meanwhile: this
    run waits, then finds the stamp and compiles nothing."""
    waiting = ToyBuild()
    waiting.build_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(waiting.build_dir) + ".lock")
    lock.acquire()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", waiting.run()))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while waiting.calls["prepare"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.calls["prepare"] == 1 and t.is_alive()  # prepared, now blocked on the lock
        out = waiting.build_dir / "toy-bin"  # "the other process" builds and stamps
        out.write_text("built elsewhere\n")
        stamps.write_stamp(waiting.stamp_path, stamps.make_stamp(waiting.inputs, {"toy-bin": out}))
    finally:
        lock.release()
    t.join(30)
    r = result["r"]
    assert r.cache_hit and r.notes == ("built by a concurrent run",) and waiting.calls["compile"] == 0
    assert r.binaries["toy-bin"].read_text() == "built elsewhere\n"


def test_local_source_dir_is_never_reused(home, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    ToyBuild(source_dir=tree).run()
    again = ToyBuild(source_dir=tree)
    assert not again.run().cache_hit and again.calls["compile"] == 1
