"""The CLI as a user runs it (`python -m pylmserv` subprocesses): hash, prefetch, bad input.

Every bad input must give one `error:` line (plus an optional `hint:`), a non-zero exit,
no traceback, and leave an existing lock byte-for-byte untouched."""
from __future__ import annotations

import json
import subprocess

import pytest

from pylmserv.core.hashing import Hash
from tests.conftest import run_cli
from tests.support import gitrepos


def assert_one_line_error(proc, code=None, needle=None):
    assert proc.returncode != 0, proc.stderr
    if code is not None:
        assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    others = [ln for ln in proc.stderr.splitlines() if ln and not ln.startswith(("error:", "hint:", "drift:"))]
    assert not others or code == 4, proc.stderr
    if needle:
        assert needle in errors[0], errors[0]


# -- hash ----------------------------------------------------------------------------------

@pytest.mark.nix
def test_hash_command_matches_nix(nix, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_bytes(b"abc")
    (tmp_path / "t" / "run").write_bytes(b"#!")
    (tmp_path / "t" / "run").chmod(0o755)
    def nixh(*args):
        return subprocess.run(["nix", "hash", *args], capture_output=True, text=True, check=True).stdout.strip()
    assert run_cli("hash", tmp_path / "t", check=True).stdout.strip() == nixh("path", str(tmp_path / "t"))
    assert run_cli("hash", tmp_path / "t" / "x", check=True).stdout.strip() == nixh("file", str(tmp_path / "t" / "x"))
    out = run_cli("hash", "--mode", "nar", "--format", "nix32", "--type", "sha512", tmp_path / "t" / "x", check=True)
    assert out.stdout.strip() == nixh("path", "--base32", "--type", "sha512", str(tmp_path / "t" / "x"))


def test_hash_to_conversions():
    h = Hash.of_bytes(b"abc")
    for value in (h.hex, h.nix32, h.sri, f"sha256:{h.nix32}", f"sha256:{h.base64}"):
        assert run_cli("hash", "--to", "sri", value, check=True).stdout.strip() == h.sri
    assert run_cli("hash", "--to", "nix32", h.sri, check=True).stdout.strip() == h.nix32
    assert_one_line_error(run_cli("hash", "--to", "sri", "not-a-hash"), 2, "cannot parse hash")
    assert_one_line_error(run_cli("hash", "/nonexistent/path"), 2, "no such file")


# -- prefetch ---------------------------------------------------------------------------------

def test_prefetch_json_on_stdout_human_on_stderr(project):
    proj, www, base = project
    proc = run_cli("prefetch", "--via", "python", "--json", cwd=proj, check=True)
    data = json.loads(proc.stdout)
    assert data["written"] is True and data["changes"][0]["status"] == "added"
    assert data["changes"][0]["new"]["hash"] == Hash.of_bytes(b"GGUF" + bytes(100)).sri
    assert "models.m: added" in proc.stderr
    again = run_cli("prefetch", "--via", "python", cwd=proj, check=True)
    assert "already up to date" in again.stderr and again.stdout == ""


def test_prefetch_check_drift_exit_4_and_lock_untouched(project):
    proj, www, base = project
    run_cli("prefetch", "--via", "python", cwd=proj, check=True)
    before = (proj / "pylmserv.lock").read_bytes()
    ok = run_cli("prefetch", "--check", "--via", "python", cwd=proj)
    assert ok.returncode == 0, ok.stderr
    (www / "m.gguf").write_bytes(b"GGUF changed")
    proc = run_cli("prefetch", "--check", "--via", "python", cwd=proj)
    assert proc.returncode == 4
    assert "drift: models.m: hash" in proc.stderr and "error: 1 entry drifted" in proc.stderr
    assert (proj / "pylmserv.lock").read_bytes() == before


BAD_CONFIGS = {
    "malformed-toml": ('[models.m]\nurl = "x\n', 2, "line 2, column"),
    "unknown-type": ('[sources.s]\ntype = "hg"\nurl = "https://x"\n', 2, "unknown source type"),
    "missing-field": ('[sources.s]\ntype = "github"\nowner = "o"\nrepo = "r"\n', 2, "missing field 'ref'"),
    "bad-hash": ('[models.m]\nurl = "{base}/m.gguf"\nsha256 = "sha256-nope"\n', 2, "bad sha256"),
    "unreachable": ('[models.m]\nurl = "http://127.0.0.1:9/m.gguf"\n', 3, "cannot reach"),
    "http-404": ('[models.m]\nurl = "{base}/missing.gguf"\n', 3, "HTTP 404"),
    "missing-ref": ('[sources.s]\ntype = "git"\nurl = "{repo}"\nref = "nope"\n', 2, "ref 'nope' not found"),
    "unreachable-git": ('[sources.s]\ntype = "git"\nurl = "file:///nonexistent/repo"\nref = "v1"\n', 3, "git ls-remote failed"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_input_one_line_error_lock_untouched(project, tmp_path, case):
    proj, www, base = project
    run_cli("prefetch", "--via", "python", cwd=proj, check=True)
    before = (proj / "pylmserv.lock").read_bytes()
    repo = gitrepos.make_repo(tmp_path / "repo", {"a": "a"})
    text, code, needle = BAD_CONFIGS[case]
    (proj / "pylmserv.toml").write_text(text.format(base=base, repo=gitrepos.uri(repo)))
    proc = run_cli("prefetch", "--via", "python", cwd=proj)
    assert_one_line_error(proc, code, needle)
    assert (proj / "pylmserv.lock").read_bytes() == before
    if case in ("http-404", "malformed-toml", "missing-ref"):
        verbose = run_cli("-v", "prefetch", "--via", "python", cwd=proj)
        assert verbose.returncode == code and "Traceback" in verbose.stderr  # -v shows it


def test_corrupt_lock_is_reported_not_overwritten(project):
    proj, www, base = project
    (proj / "pylmserv.lock").write_text("version = 1\n[models.m]\nhash = 12\n")
    before = (proj / "pylmserv.lock").read_bytes()
    proc = run_cli("prefetch", "--via", "python", cwd=proj)
    assert_one_line_error(proc, 2, "pylmserv.lock")
    assert "prefetch --refresh" in proc.stderr
    assert (proj / "pylmserv.lock").read_bytes() == before


def test_packaged_default_lock_is_never_written(tmp_path):
    proc = run_cli("prefetch", "llama-cpp", cwd=tmp_path)  # no pylmserv.toml here
    assert_one_line_error(proc, 2, "refusing to write the packaged default lock")
    assert "hint: Create a local pylmserv.toml" in proc.stderr


def test_unknown_name_and_backend(project):
    proj, www, base = project
    assert_one_line_error(run_cli("prefetch", "nope", cwd=proj), 2, "unknown name(s): nope")
    bad = run_cli("prefetch", "--via", "magic", cwd=proj)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_help_and_version():
    assert "prefetch" in run_cli("--help", check=True).stdout
    assert "--check" in run_cli("prefetch", "--help", check=True).stdout
    assert run_cli("--version", check=True).stdout.startswith("pylmserv")
