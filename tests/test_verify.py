"""`pylmserv verify`: rot in blobs, source trees and model entries is found, moved aside
(not deleted) and restored by the next fetch/build; doctor says when it last ran."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pylmserv.app.fetch_models import fetch
from pylmserv.core.hashing import Hash
from pylmserv.core.nar import nar_hash
from pylmserv.store import blobs as store
from pylmserv.store.integrity import last_verified, verify_store
from pylmserv.store.trees import ensure_source
from tests.conftest import run_cli
from tests.test_archive import RICH_TREE, write_tar
from tests.test_gguf import write_gguf
from tests.test_sources import nar_entry


@pytest.fixture
def model(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf", pad=256 << 10).read_bytes()


def cli_verify(home, *args):
    proc = run_cli("verify", "--json", *args, env={"PYLMSERV_HOME": str(home)})
    return proc, json.loads(proc.stdout) if proc.stdout.strip() else None


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def by_kind(report, kind):
    return [e for e in report["entries"] if e["kind"] == kind]


def test_clean_store_verifies_and_doctor_says_when(home, server, model):
    url = server.add("tiny.gguf", model)
    fetch([url], sha256=Hash.of_bytes(model), progress=False)
    proc, report = cli_verify(home)
    assert proc.returncode == 0, proc.stderr
    assert report["bad"] == 0 and report["checked"] == 2
    assert [e["status"] for e in report["entries"]] == ["ok", "ok"]
    assert by_kind(report, "blob")[0]["name"] == Hash.of_bytes(model).hex
    assert last_verified(home)["checked_at"] == report["checked_at"]
    doctor = run_cli("doctor", "--json", env={"PYLMSERV_HOME": str(home)})
    [check] = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "store-verified"]
    assert report["checked_at"] in check["detail"] and "0 bad" in check["detail"]


def test_doctor_says_never_before_the_first_verify(home):
    doctor = run_cli("doctor", "--json", env={"PYLMSERV_HOME": str(home)})
    [check] = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "store-verified"]
    assert check["detail"].startswith("never") and "pylmserv verify" in check["hint"]


def test_flipped_bit_in_a_blob_is_moved_aside_and_the_next_fetch_restores_it(home, server, model):
    url = server.add("tiny.gguf", model)
    h = Hash.of_bytes(model)
    fetch([url], sha256=h, progress=False)
    flip_byte(store.blob_path(h), len(model) // 2)  # the entry is a hardlink: it rots too
    proc, report = cli_verify(home)
    assert proc.returncode == 4
    assert "2 of 2 store entries are bad" in proc.stderr and "Traceback" not in proc.stderr
    [blob] = by_kind(report, "blob")
    assert blob["status"] == "bad" and blob["expected"] == h.hex and blob["got"] != h.hex
    [entry] = by_kind(report, "model")
    assert entry["status"] == "bad" and "bad blob" in entry["detail"]
    # Moved aside, not deleted: the rotten bytes are kept in quarantine/.
    assert not store.blob_path(h).exists() and not (home / "models" / "tiny").exists()
    moved = Path(blob["moved_to"])
    assert moved.parent == home / "quarantine" and len(moved.read_bytes()) == len(model)
    assert Path(entry["moved_to"]).is_dir()
    server.reset_counters()
    [r] = fetch([url], sha256=h, progress=False)
    assert r.bytes_downloaded == len(model) and r.path.read_bytes() == model
    proc, report = cli_verify(home)
    assert proc.returncode == 0 and report["bad"] == 0
    assert last_verified(home)["bad"] == 0


def test_truncated_blob_and_no_repair(home, server, model):
    url = server.add("tiny.gguf", model)
    h = Hash.of_bytes(model)
    fetch([url], sha256=h, progress=False)
    os.chmod(store.blob_path(h), 0o644)
    os.truncate(store.blob_path(h), 100)
    report = verify_store(repair=False)
    assert {f.kind: f.status for f in report.findings} == {"blob": "bad", "model": "bad"}
    assert store.blob_path(h).exists() and all(f.moved_to is None for f in report.findings)


@pytest.mark.parametrize("tamper", ["extra-file", "escaping-symlink", "replaced-file", "removed-file"])
def test_tampered_model_entry_is_bad(home, server, model, tmp_path, tamper):
    url = server.add("tiny.gguf", model)
    h = Hash.of_bytes(model)
    fetch([url], sha256=h, progress=False)
    entry = home / "models" / "tiny"
    if tamper == "extra-file":
        (entry / "evil.sh").write_text("#!/bin/sh\n")
    elif tamper == "escaping-symlink":
        os.symlink("/etc/passwd", entry / "passwd")
    elif tamper == "replaced-file":
        os.unlink(entry / "tiny.gguf")
        (entry / "tiny.gguf").write_bytes(model[:-1] + b"\0")  # same size, other bytes
    else:
        os.unlink(entry / "tiny.gguf")
    report = verify_store()
    [f] = [f for f in report.findings if f.kind == "model"]
    assert f.status == "bad" and f.moved_to is not None
    assert [g.status for g in report.findings if g.kind == "blob"] == ["ok"]  # the blob itself is fine
    [r] = fetch([url], sha256=h, progress=False)  # restored from the intact blob, no download
    assert r.bytes_downloaded == 0 and r.path.read_bytes() == model
    assert verify_store().bad == []


def test_source_tree_rot_is_moved_aside_and_the_next_build_fetch_restores_it(home, http_dir):
    root, base = http_dir
    write_tar(root / "pkg.tar.gz", RICH_TREE)
    from pylmserv.core.archive import extract

    tree = extract(root / "pkg.tar.gz", home.parent / "ref", policy="tar", strip_single_root=True)
    entry = nar_entry("pkg", f"{base}/pkg.tar.gz", nar_hash(tree), type="url", unpack=True)
    path = ensure_source(entry)
    assert [f.status for f in verify_store(["pkg"]).findings] == ["ok"]
    victim = next(p for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink())
    os.chmod(victim, 0o644)
    victim.write_bytes(victim.read_bytes() + b"!")
    [f] = verify_store(["pkg"]).findings
    assert f.kind == "source" and f.status == "bad" and f.expected == entry.hash.sri
    assert not path.exists() and f.moved_to.is_dir()
    assert ensure_source(entry) == path and nar_hash(path) == entry.hash


def test_verify_names_only_checks_those(home, server, model, tmp_path):
    other = write_gguf(tmp_path / "other.gguf", pad=128 << 10).read_bytes()
    fetch([server.add("tiny.gguf", model)], sha256=Hash.of_bytes(model), progress=False)
    fetch([server.add("other.gguf", other)], sha256=Hash.of_bytes(other), progress=False)
    flip_byte(store.blob_path(Hash.of_bytes(other)), 10)
    report = verify_store(["tiny"])
    assert report.bad == [] and {f.name for f in report.findings} == {"tiny", Hash.of_bytes(model).hex}
    proc, report = cli_verify(home, "nope")
    assert proc.returncode == 0 and [e["status"] for e in report["entries"]] == ["missing"]


def test_fetch_of_a_name_whose_blob_was_deleted_fetches_it_again(home, server, model):
    url = server.add("tiny.gguf", model)
    h = Hash.of_bytes(model)
    fetch([url], sha256=h, progress=False)
    os.unlink(store.blob_path(h))  # the named entry and its manifest are left behind
    server.reset_counters()
    [r] = fetch([url], sha256=h, progress=False)
    assert r.bytes_downloaded == len(model) and store.blob_path(h).read_bytes() == model
    assert os.path.samefile(r.path, store.blob_path(h))
