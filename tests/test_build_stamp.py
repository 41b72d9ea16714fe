"""Build keys and stamps (generic: the llama.cpp and llamafile builders share them)."""
from __future__ import annotations

import os

from pylmserv.store import records as s


def test_key_is_stable_and_order_independent():
    a = s.build_key({"backend": "cpu", "targets": ["llama-cli"], "portable": False})
    b = s.build_key({"portable": False, "targets": ["llama-cli"], "backend": "cpu"})
    assert a == b and len(a) == 16
    assert a != s.build_key({"backend": "cuda", "targets": ["llama-cli"], "portable": False})


def test_stamp_round_trip_and_up_to_date(tmp_path):
    out = tmp_path / "llama-cli"
    out.write_bytes(b"binary")
    inputs = {"backend": "cpu", "targets": ("llama-cli",)}
    st = s.make_stamp(inputs, {"llama-cli": out}, seconds=1.5, extra={"note": "x"})
    path = s.write_stamp(tmp_path / s.STAMP_NAME, st)
    back = s.read_stamp(path)
    assert back == st
    assert s.is_up_to_date(back, ["llama-cli"], inputs=inputs)
    assert s.is_up_to_date(back, [str(out)])
    assert s.is_up_to_date(back)


def test_changed_inputs_missing_or_changed_outputs_are_not_up_to_date(tmp_path):
    out = tmp_path / "llama-cli"
    out.write_bytes(b"binary")
    inputs = {"backend": "cpu"}
    st = s.make_stamp(inputs, {"llama-cli": out})
    assert not s.is_up_to_date(st, ["llama-cli"], inputs={"backend": "cuda"})
    assert not s.is_up_to_date(st, ["llama-server"], inputs=inputs)  # never built
    out.write_bytes(b"binary, rebuilt by hand")
    assert not s.is_up_to_date(st, ["llama-cli"], inputs=inputs)
    out.unlink()
    assert not s.is_up_to_date(st, ["llama-cli"], inputs=inputs)
    assert not s.is_up_to_date(None, ["llama-cli"])


def test_unreadable_or_foreign_stamp_reads_as_none(tmp_path):
    p = tmp_path / s.STAMP_NAME
    assert s.read_stamp(p) is None
    p.write_text("{half a stamp")
    assert s.read_stamp(p) is None
    p.write_text('{"version": 99}')
    assert s.read_stamp(p) is None


def test_write_is_atomic_no_temp_left(tmp_path):
    out = tmp_path / "o"
    out.write_text("x")
    s.write_stamp(tmp_path / s.STAMP_NAME, s.make_stamp({"a": 1}, {"o": out}))
    assert sorted(os.listdir(tmp_path)) == ["o", s.STAMP_NAME]
    s.remove_stamp(tmp_path / s.STAMP_NAME)
    s.remove_stamp(tmp_path / s.STAMP_NAME)  # idempotent
    assert not (tmp_path / s.STAMP_NAME).exists()
