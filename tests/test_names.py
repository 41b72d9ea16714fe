"""One rule for names (core/names.py), checked when the config or lock is loaded, so every
command and the flake accept the same set; human output escapes control characters."""
from __future__ import annotations

import pytest

from pylmserv.core.errors import ConfigError
from pylmserv.core.hashing import Hash
from pylmserv.core.names import MAX_NAME, check_name, pin_name, show
from pylmserv.pins.config import load_config, load_lock, packaged_dir
from tests.conftest import run_cli

BAD = {
    "qwen2.5": "contains a dot",
    "a/b": "may only use",
    "a\\b": "may only use",
    ".hidden": "contains a dot",
    "-rf": "may only use",
    "bell\x07": "may only use",
    "esc\x1b[31m": "may only use",
    "x" * (MAX_NAME + 1): "characters long",
    "caf\u00e9": "may only use",
    "a b": "may only use",
    "model#x": "may only use",
}


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("kind", ["sources", "models"])
def test_bad_names_refused_when_the_config_is_loaded(tmp_path, name, kind):
    body = 'type = "url"\nurl = "https://example.org/a.bin"' if kind == "sources" else 'url = "https://example.org/a.gguf"'
    import json
    key = json.dumps(name)  # a TOML basic string with escapes
    (tmp_path / "pylmserv.toml").write_text(f"[{kind}.{key}]\n{body}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "pylmserv.toml")
    assert BAD[name] in exc.value.message
    assert "\x1b" not in exc.value.message and "\x07" not in exc.value.message


def test_bad_name_in_a_lock_refused(tmp_path):
    h = Hash.of_bytes(b"").sri
    (tmp_path / "pylmserv.lock").write_text(f'version = 2\n[models."a.b"]\ntype = "file"\nurl = "https://x/a"\n'
                                           f'hash = "{h}"\nmode = "flat"\n')
    with pytest.raises(ConfigError, match="contains a dot"):
        load_lock(tmp_path / "pylmserv.lock")


def test_packaged_catalog_names_follow_the_rule():
    cfg = load_config(packaged_dir() / "pylmserv.toml")
    for name in [*cfg.sources, *cfg.models]:
        assert check_name(name, "x") == name


def test_pin_name_makes_names_that_follow_the_rule():
    for text in ("qwen2.5-0.5b-instruct-q4_k_m", "-x", "a/b\x1b", "", "é" * 300):
        assert check_name(pin_name(text), "x")
    assert pin_name("qwen2.5-0.5b") == "qwen2_5-0_5b"


def test_show_escapes_terminal_controls():
    assert show("a\x1b[2Jb\x07c\x9bd\u202ee") == "a\\x1b[2Jb\\x07c\\x9bd\\u202ee"
    assert show("x\ny", lines=True) == "x\ny" and show("x\ny") == "x\\ny"


def test_cli_never_prints_raw_escape_from_a_config(tmp_path, home):
    # A hostile description and a hostile value reach error output only escaped.
    (tmp_path / "pylmserv.toml").write_text(
        '[models.m]\nurl = "https://example.org/\\u001b]0;pwned\\u0007.gguf"\ndescription = "\\u001b[2J"\n')
    for args in (["prefetch"], ["list"], ["fetch", "m"], ["doctor"]):
        proc = run_cli("--config", tmp_path / "pylmserv.toml", *args, env={"PYLMSERV_HOME": str(home)})
        assert "\x1b" not in proc.stdout + proc.stderr and "\x07" not in proc.stdout + proc.stderr, args
    proc = run_cli("--config", tmp_path / "pylmserv.toml", "prefetch", env={"PYLMSERV_HOME": str(home)})
    assert proc.returncode == 2 and "control character U+001B" in proc.stderr


def test_every_command_refuses_the_same_bad_name(tmp_path, home):
    (tmp_path / "pylmserv.toml").write_text('[models."m.v2"]\nurl = "https://example.org/a.gguf"\n')
    for args in (["prefetch"], ["fetch", "m.v2"], ["list"]):
        proc = run_cli("--config", tmp_path / "pylmserv.toml", *args, env={"PYLMSERV_HOME": str(home)})
        assert proc.returncode == 2 and "contains a dot" in proc.stderr, (args, proc.stderr)


NAME_SAMPLES = ["ok", "a_b-c", "_x", "-x", "a.b", "A9", "x" * 100, "x" * 101, "é", "a b", "a/b", "", "1"]
VERSION_SAMPLES = ["3.3.6", "b9941", "1.0+cu", "v1_2-3", ".1", "-1", "1 2", "", "x" * 100, "x" * 101, "1\u00e9"]


@pytest.mark.nix
def test_the_flake_accepts_the_same_names_and_versions(nix):
    """nix/sources.nix's validName / validVersion, evaluated by real Nix, agree with
    core/names.py on every sample: one set for every command and the flake."""
    import json
    import subprocess
    from pathlib import Path

    from pylmserv.core.errors import ConfigError
    from pylmserv.core.names import check_version

    repo = Path(__file__).resolve().parent.parent
    expr = (f"let s = import {repo}/nix/sources.nix {{ lock = {{ version = 2; }}; }}; in "
            f"{{ names = map s.validName (builtins.fromJSON {json.dumps(json.dumps(NAME_SAMPLES))}); "
            f"versions = map s.validVersion (builtins.fromJSON {json.dumps(json.dumps(VERSION_SAMPLES))}); }}")
    out = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    flake = json.loads(out.stdout)

    def ok(check, value):
        try:
            check(value, "x")
            return True
        except ConfigError:
            return False

    assert flake["names"] == [ok(check_name, n) for n in NAME_SAMPLES]
    assert flake["versions"] == [ok(check_version, v) for v in VERSION_SAMPLES]
