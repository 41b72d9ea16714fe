"""cosmocc as a locked toolchain, against the cosmocc *fixture* zip (tests/support/
cosmocc_fixture.py) served on 127.0.0.1 and locked with its real flat hash: the real
cosmocc zip is on no registry reachable here."""
from __future__ import annotations

import os
import stat
import subprocess
import zipfile

import pytest

from pylmserv.builders.cosmocc import ensure_cosmocc, find_entry, fix_exec_bits, toolchain_dir
from pylmserv.pins.config import Lock, LockEntry, load_lock
from pylmserv.core.errors import ConfigError, VerificationError
from pylmserv.core.hashing import Hash, file_hash
from tests.conftest import REPO
from tests.support.cosmocc_fixture import build_cosmocc_zip, fixture_files


def served_cosmocc(http_dir, version="3.3.6", hash_=None) -> LockEntry:
    root, base = http_dir
    z = build_cosmocc_zip(root / f"cosmocc-{version}.zip", version)
    return LockEntry("sources", "cosmocc-" + version.replace(".", "_"), f"{base}/cosmocc-{version}.zip",
                     hash_ or file_hash(z), "flat", extra={"type": "url", "unpack": False, "version": version})


def test_cosmocc_fixture_unpacked_once_with_exec_bits_fixed(http_dir, home):
    entry = served_cosmocc(http_dir)
    cc = ensure_cosmocc(entry)
    assert cc.root == toolchain_dir(entry) and cc.root.parent == home / "toolchains"
    assert cc.version == "3.3.6" and cc.fixed_modes == ("bin/cosmoranlib",)
    assert stat.S_IMODE(os.stat(cc.bin / "cosmoranlib").st_mode) == 0o555  # 0444 in the zip
    assert stat.S_IMODE(os.stat(cc.bin / "ape-m1.c").st_mode) == 0o644  # C source: left alone
    assert stat.S_IMODE(os.stat(cc.root / "include/stdio.h").st_mode) == 0o644
    # never stripped or patched: every file is byte-for-byte the zip member
    for name, (data, _mode) in fixture_files().items():
        assert (cc.root / name).read_bytes() == data, name
    assert cc.loader("x86_64") == cc.bin / "ape-x86_64.elf" and cc.loader("arm64") == cc.bin / "ape-aarch64.elf"
    # the verified zip is in the content-addressed store
    assert (home / "blobs" / "sha256" / entry.hash.hex).is_file()
    # second call: no network (the server no longer has the file), same tree
    (http_dir[0] / "cosmocc-3.3.6.zip").unlink()
    again = ensure_cosmocc(entry)
    assert again == cc


def test_cosmocc_fixture_fixed_tool_runs(http_dir, home):
    cc = ensure_cosmocc(served_cosmocc(http_dir))
    proc = subprocess.run([str(cc.bin / "cosmoranlib"), "x.a"], capture_output=True, timeout=30)
    assert proc.returncode == 0


def test_cosmocc_fixture_wrong_hash_leaves_nothing(http_dir, home):
    entry = served_cosmocc(http_dir, hash_=Hash.of_bytes(b"not the zip"))
    with pytest.raises(VerificationError, match="hash mismatch"):
        ensure_cosmocc(entry)
    assert not toolchain_dir(entry).exists()
    assert not (home / "blobs" / "sha256" / entry.hash.hex).exists()


@pytest.mark.nix
def test_cosmocc_fixture_hash_matches_nix(http_dir, home, nix):
    entry = served_cosmocc(http_dir)
    out = subprocess.run(["nix-prefetch-url", "--type", "sha256", entry.url], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert Hash.parse(out, "sha256") == entry.hash


def test_cosmocc_entry_lookup_in_the_packaged_lock():
    lock = load_lock(REPO / "pylmserv.lock")
    for version in ("3.3.6", "3.9.7", "4.0.2"):
        e = find_entry(lock, version)
        assert e.get("version") == version and e.mode == "flat" and e.url.endswith(f"cosmocc-{version}.zip")
    assert find_entry(lock, lock.sources["llamafile"].get("cosmocc")).name == "cosmocc-3_3_6"
    with pytest.raises(ConfigError, match=r"no cosmocc 9.9.9 .*locked: 3.3.6, 3.9.7, 4.0.2"):
        find_entry(lock, "9.9.9")
    with pytest.raises(ConfigError):
        find_entry(Lock(path=None), "3.3.6")


def test_cosmocc_nar_pin_is_refused(home):
    entry = LockEntry("sources", "cosmocc-3_3_6", "http://127.0.0.1:1/x.zip", Hash.of_bytes(b""), "nar",
                      extra={"version": "3.3.6"})
    with pytest.raises(ConfigError, match="flat"):
        ensure_cosmocc(entry)


def test_fix_exec_bits_only_touches_executables(tmp_path):
    files = {"a.sh": (b"#!/bin/sh\n", 0o444), "ape": (b"MZqFpD='\n", 0o640), "elf": (b"\x7fELF\x02", 0o600),
             "data": (b"hello", 0o644), "ok": (b"#!/bin/sh\n", 0o755), "noread": (b"#!/bin/sh\n", 0o200)}
    for name, (data, mode) in files.items():
        (tmp_path / name).write_bytes(data)
        os.chmod(tmp_path / name, mode)
    assert fix_exec_bits(tmp_path) == ["a.sh", "ape", "elf"]
    modes = {n: stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in files}
    assert modes == {"a.sh": 0o555, "ape": 0o750, "elf": 0o700, "data": 0o644, "ok": 0o755, "noread": 0o200}


def test_cosmocc_fixture_zip_records_the_wrong_mode(tmp_path):
    z = build_cosmocc_zip(tmp_path / "c.zip")
    with zipfile.ZipFile(z) as zf:
        assert (zf.getinfo("bin/cosmoranlib").external_attr >> 16) & 0o777 == 0o444
