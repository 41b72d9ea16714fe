"""core/record.py: the one base of the immutable records (what a frozen dataclass gave)."""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import pytest

from pylmserv.core.record import Factory, Record, field_names


class Point(Record):
    __slots__ = ("x", "y", "tags")
    _defaults = {"y": 0, "tags": Factory(dict)}


class Point3(Point):
    __slots__ = ("z",)
    _defaults = {"y": 7, "z": None}  # overrides the parent's default for y


class Other(Record):
    __slots__ = ("x", "y", "tags")
    _defaults = {"y": 0, "tags": Factory(dict)}


class Pair(Record):
    __slots__ = ("a", "b")

    def __hash__(self):
        return hash(self._values())


def test_fields_in_order_parents_first():
    assert field_names(Point) == ("x", "y", "tags")
    assert field_names(Point3) == ("x", "y", "tags", "z")
    assert field_names(Point3(1)) == ("x", "y", "tags", "z")


def test_defaults_and_a_subclass_override():
    p = Point(1)
    assert (p.x, p.y, p.tags) == (1, 0, {})
    q = Point3(1)
    assert (q.x, q.y, q.tags, q.z) == (1, 7, {}, None)
    assert Point(1).y == 0  # the parent's default is untouched


def test_mutable_defaults_are_fresh_per_instance():
    a, b = Point(1), Point(1)
    assert a.tags == {} and a.tags is not b.tags
    a.tags["k"] = 1
    assert b.tags == {} and Point(2).tags == {}


def test_positional_and_keyword_init():
    assert Point(1, 2, {"a": 1}) == Point(x=1, y=2, tags={"a": 1}) == Point(1, tags={"a": 1}, y=2)
    assert Point3(1, 2, {}, 3).z == 3


@pytest.mark.parametrize("args,kwargs,match", [
    ((), {}, r"missing 1 required argument\(s\): 'x'"),
    ((1,), {"w": 2}, "unexpected keyword argument 'w'"),
    ((1,), {"x": 2}, "multiple values for argument 'x'"),
    ((1, 2, {}, 4), {}, "takes 3 positional arguments but 4 were given"),
])
def test_bad_arguments_are_type_errors(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        Point(*args, **kwargs)


def test_missing_names_every_missing_field():
    with pytest.raises(TypeError, match=r"missing 2 required argument\(s\): 'a', 'b'"):
        Pair()


def test_immutable():
    p = Point(1)
    with pytest.raises(AttributeError, match="immutable"):
        p.x = 2
    with pytest.raises(AttributeError, match="immutable"):
        del p.x
    with pytest.raises(AttributeError):
        p.other = 1  # no such field either
    assert p.x == 1
    assert not hasattr(p, "__dict__")


def test_equality_by_value_and_type():
    assert Point(1, 2) == Point(1, 2)
    assert Point(1, 2) != Point(1, 3)
    assert Point(1, 2) != Other(1, 2)  # same values, another type
    assert Point3(1, 0, {}, None) != Point(1, 0, {})
    assert Point(1) != (1, 0, {})


def test_unhashable_unless_the_subclass_says_so():
    with pytest.raises(TypeError):
        hash(Point(1))
    assert hash(Pair(1, 2)) == hash(Pair(1, 2))
    assert {Pair(1, 2), Pair(1, 2)} == {Pair(1, 2)}


def test_replace():
    p = Point3(1, 2, {"t": 1}, 3)
    q = p.replace(y=5)
    assert q == Point3(1, 5, {"t": 1}, 3) and type(q) is Point3
    assert p.y == 2  # the original is unchanged
    with pytest.raises(TypeError, match="no field"):
        p.replace(w=1)


def test_repr():
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags={})"


@pytest.mark.parametrize("roundtrip", [
    lambda r: pickle.loads(pickle.dumps(r)), copy.deepcopy, copy.copy])
def test_pickle_and_copy_round_trip(roundtrip):
    p = Point3(1, 2, {"t": [1]}, "z")
    q = roundtrip(p)
    assert q == p and type(q) is Point3


def test_deepcopy_copies_mutable_values():
    p = Point(1, tags={"t": [1]})
    q = copy.deepcopy(p)
    assert q.tags == p.tags and q.tags is not p.tags


def test_class_errors_are_caught_at_definition():
    with pytest.raises(TypeError, match="default"):
        class Bad(Record):
            __slots__ = ("a",)
            _defaults = {"b": 1}
    with pytest.raises(TypeError, match="twice"):
        class Twice(Point):
            __slots__ = ("x",)


def test_the_pins_are_records_with_dataclass_behaviour():
    """The lock's records keep what their frozen dataclasses had: field order, the
    overridden mode default, value hashing, the legacy LockEntry constructor."""
    from pylmserv.core.hashing import Hash
    from pylmserv.pins.lock import FilePin, GitPin, HfPin, Lock, LockEntry, Shard

    h = Hash.of_bytes(b"x")
    assert field_names(FilePin)[:7] == ("kind", "name", "url", "hash", "mode", "rev", "size")
    assert FilePin("models", "m", "https://x/m.gguf", h).mode == "flat"
    assert GitPin("sources", "s", "https://x/r.git", h).mode == "nar"
    pin = HfPin("models", "m", "https://x/m.gguf", h, shards=(Shard("b", "https://x/b", h),))
    assert hash(pin) == hash(copy.deepcopy(pin)) and pickle.loads(pickle.dumps(pin)) == pin
    legacy = LockEntry("models", "m", "https://x/m.gguf", h, "flat")
    assert type(legacy) is FilePin
    lock = Lock(path=None)
    assert lock.sources is not Lock(path=None).sources
    assert lock.with_entry(legacy).models == {"m": legacy} and lock.models == {}


@pytest.mark.parametrize("modules", [
    # What Record is for: `build`'s modules load without the dataclasses module (~4 M
    # instructions a dataclass on Python 3.11, and the module itself).
    "pylmserv.cli, pylmserv.cli.build, pylmserv.pins.config, pylmserv.builders",
    # `pylmserv fetch` of a small file is mostly start-up: its modules' records are Records (or
    # plain slotted classes), and the lock it takes is its own (tests/test_flock.py).
    "pylmserv.cli, pylmserv.cli.fetch, pylmserv.app.fetch_models",
], ids=["build", "fetch"])
def test_the_start_up_paths_import_no_dataclasses(modules):
    code = f"import sys, {modules}\nprint('dataclasses' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.stdout.strip() == "False"


def test_the_fetch_records_keep_their_dataclass_behaviour():
    """Value equality, a frozen dataclass's hash, keyword defaults, to_json and a readable repr."""
    from pathlib import Path

    from pylmserv.app.fetch_models import FetchResult, _Plan
    from pylmserv.core.gguf import GGUFHeader
    from pylmserv.core.hashing import Hash
    from pylmserv.store.adopt import Found, Outcome, Place, Want
    from pylmserv.transfer.download import Probe

    h = Hash.of_bytes(b"x")
    r = FetchResult("m", Path("/s/m"), 1, h, 0.5, 1)
    assert r.files == () and r.dest is None and r == FetchResult("m", Path("/s/m"), 1, h, 0.5, 1, ())
    assert hash(r) == hash(copy.copy(r)) and r.to_json()["sha256"] == h.hex
    assert repr(r).startswith("FetchResult(name='m', path=")
    with pytest.raises(AttributeError):
        r.size = 2
    assert {Place("hf", Path("/a")), Place("hf", Path("/a"))} == {Place("hf", Path("/a"))}
    assert Want(h, 1, "m.gguf").repo is None and Found(Path("/f"), "hf", 1).bytes_copied == 0
    assert Outcome().skipped == [] and Outcome().skipped is not Outcome().skipped and Outcome() == Outcome()
    assert GGUFHeader(3, 0, 0).metadata == {} and GGUFHeader(3, 0, 0).metadata is not GGUFHeader(3, 0, 0).metadata
    plan = _Plan("m", [])
    plan.name = "n"  # mutable, as the dataclass was
    assert (plan.name, plan.archive, plan.record) == ("n", False, None)
    probe = Probe("u", None, 'W/"e"', "Mon", False)
    probe.response = None
    assert probe.validator == "Mon" and probe.encoded is False
