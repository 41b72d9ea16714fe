"""binfmt_misc judgement against binfmt_misc directories the tests fabricate (the real
/proc/sys/fs/binfmt_misc cannot be changed from a test): the exact text the kernel shows."""
from __future__ import annotations

from pathlib import Path

from pylmserv.builders import binfmt
from pylmserv.builders.binfmt import APE_REGISTERED, MZ_HIJACKED, NO_APE_LOADER, UNAVAILABLE, read_binfmt

# What Linux prints for rules registered by Debian's wine + binfmt-support and by cosmo's
# documented `echo ':APE:M::MZqFpD::/usr/bin/ape:' > register`.
WINE = "enabled\ninterpreter /usr/bin/wine\nflags: \noffset 0\nmagic 4d5a\n"
RUN_DETECTORS_CLI = "enabled\ninterpreter /usr/lib/binfmt-support/run-detectors\nflags: \noffset 0\nmagic 4d5a\n"
APE = "enabled\ninterpreter /usr/bin/ape\nflags: \noffset 0\nmagic 4d5a71467044\n"
APE_JART = "enabled\ninterpreter /usr/bin/ape\nflags: \noffset 0\nmagic 6a6172747372\n"
PYTHON = "enabled\ninterpreter /usr/bin/python3.11\nflags: \noffset 0\nmagic a70d0d0a\n"
EXE_BY_EXTENSION = "enabled\ninterpreter /usr/bin/wine\nflags: \nextension .exe\n"
MASKED_MZ = "enabled\ninterpreter /usr/bin/mono\nflags: \noffset 0\nmagic 4d5a0000\nmask ffff0000\n"


def fabricate(tmp_path: Path, status: str = "enabled", **entries: str) -> Path:
    d = tmp_path / "binfmt_misc"
    d.mkdir()
    (d / "status").write_text(status + "\n")
    (d / "register").write_text("")
    for name, text in entries.items():
        (d / name).write_text(text)
    return d


def test_binfmt_wine_registered_for_mz_is_a_hijack(tmp_path):
    d = fabricate(tmp_path, wine=WINE, **{"python3.11": PYTHON})
    r = read_binfmt(d)
    assert r.state == MZ_HIJACKED and not r.direct_exec_ok
    assert [e.name for e in r.hijackers] == ["wine"]
    assert "wine (/usr/bin/wine)" in r.summary
    assert f"sudo sh -c 'echo 0 > {d / 'wine'}'   # disable wine until reboot" in r.fix
    assert "sudo update-binfmts --disable wine   # keep it disabled across reboots (binfmt-support)" in r.fix
    assert any(f"echo ':APE:M::MZqFpD::/usr/bin/ape:' > {d / 'register'}" in line for line in r.fix)


def test_binfmt_run_detectors_hijacks_even_with_ape_registered(tmp_path):
    # Both match MZqFpD; the kernel's order is not visible, so this is not safe to run directly.
    d = fabricate(tmp_path, cli=RUN_DETECTORS_CLI, APE=APE, **{"APE-jart": APE_JART})
    r = read_binfmt(d)
    assert r.state == MZ_HIJACKED
    assert [e.name for e in r.hijackers] == ["cli"] and [e.name for e in r.ape_loaders] == ["APE", "APE-jart"]
    assert not any("register" in line for line in r.fix)  # the loader is there; only the hijacker must go


def test_binfmt_ape_registered_alone_runs_directly(tmp_path):
    d = fabricate(tmp_path, APE=APE, wine_exe=EXE_BY_EXTENSION, **{"python3.11": PYTHON})
    r = read_binfmt(d)
    assert r.state == APE_REGISTERED and r.direct_exec_ok and r.fix == ()
    assert "APE -> /usr/bin/ape" in r.summary


def test_binfmt_disabled_wine_rule_does_not_count(tmp_path):
    d = fabricate(tmp_path, APE=APE, wine=WINE.replace("enabled", "disabled", 1))
    assert read_binfmt(d).state == APE_REGISTERED


def test_binfmt_masked_mz_rule_matches(tmp_path):
    d = fabricate(tmp_path, APE=APE, mono=MASKED_MZ)
    r = read_binfmt(d)
    assert r.state == MZ_HIJACKED and [e.name for e in r.hijackers] == ["mono"]


def test_binfmt_neither_registered(tmp_path):
    d = fabricate(tmp_path, **{"python3.11": PYTHON})
    r = read_binfmt(d, loader_hint="/store/toolchains/cosmocc-3.3.6/bin/ape-x86_64.elf")
    assert r.state == NO_APE_LOADER and not r.direct_exec_ok
    assert r.fix[0] == "sudo cp /store/toolchains/cosmocc-3.3.6/bin/ape-x86_64.elf /usr/bin/ape && sudo chmod 755 /usr/bin/ape"


def test_binfmt_globally_disabled_and_not_mounted(tmp_path):
    d = fabricate(tmp_path, status="disabled", APE=APE)
    r = read_binfmt(d)
    assert r.state == UNAVAILABLE and r.mounted and not r.enabled
    assert r.fix[0] == f"sudo sh -c 'echo 1 > {d / 'status'}'"
    missing = read_binfmt(tmp_path / "nowhere")
    assert missing.state == UNAVAILABLE and not missing.mounted
    assert missing.fix[0].startswith("sudo mount -t binfmt_misc binfmt_misc ")


def test_binfmt_entry_parsing_and_ape_detection(tmp_path):
    e = binfmt.parse_entry("wine", WINE)
    assert (e.enabled, e.interpreter, e.offset, e.magic) == (True, "/usr/bin/wine", 0, b"MZ")
    assert e.matches(b"MZqFpD='\n") and not e.matches(b"\x7fELF") and e.kind == "wine"
    ape_file = tmp_path / "tool"
    ape_file.write_bytes(b"MZqFpD='\n\n#!/bin/sh\n")
    elf = tmp_path / "elf"
    elf.write_bytes(b"\x7fELF\x02\x01\x01")
    assert binfmt.is_ape(ape_file) and not binfmt.is_ape(elf) and not binfmt.is_ape(tmp_path / "missing")


def test_binfmt_reads_the_real_proc_without_error():
    r = read_binfmt()  # whatever this machine has: it must be judged, not crash
    assert r.state in (APE_REGISTERED, MZ_HIJACKED, NO_APE_LOADER, UNAVAILABLE) and r.summary
