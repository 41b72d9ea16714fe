"""Options of the CLI that no other test drives from the command line: each one run as a
user types it (`python -m pylmserv ...`), its effect checked, not just its exit code.

Oracles are independent of pylmserv: hashlib/base64 for `hash`, real Nix for `--via
nix|fod`, what a loopback server actually received for tokens, the lock file's bytes.
"""
from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import subprocess
import sys

import pytest

from pylmserv.core.hashing import Hash
from tests.conftest import run_cli
from tests.support.hubstub import serve_hub
from tests.test_gguf import write_gguf


# -- --config / --lock after the subcommand ------------------------------------------------

def test_lock_and_config_accepted_after_the_subcommand(project, tmp_path):
    proj, www, _ = project
    elsewhere = tmp_path / "elsewhere.lock"
    proc = run_cli("prefetch", "--via", "python", "--config", proj / "pylmserv.toml", "--lock", elsewhere,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert elsewhere.is_file() and not (proj / "pylmserv.lock").exists()
    assert Hash.of_bytes(b"GGUF" + bytes(100)).sri in elsewhere.read_text()
    # The same for a reader: list finds the model pinned in that lock.
    listed = run_cli("list", "--json", "--config", proj / "pylmserv.toml", "--lock", elsewhere, cwd=tmp_path)
    by = {e["name"]: e for e in json.loads(listed.stdout)["entries"]}
    assert by["m"]["locked"] is True
    # After the command, they win over the ones given before it.
    proc = run_cli("--lock", tmp_path / "nope.lock", "list", "--json", "--lock", elsewhere,
                   "--config", proj / "pylmserv.toml", cwd=tmp_path)
    assert json.loads(proc.stdout)["lock"] == str(elsewhere)



def test_every_command_that_reads_the_project_takes_config_and_lock_after_its_name():
    """The decorator, not a list: a command whose code reads the config or the lock
    (`opts.config`, `g.lock`, ...) must accept --config/--lock after its name."""
    import inspect
    import re

    from pylmserv.cli import COMMANDS, cli

    ctx = cli.make_context("pylmserv", ["list"], resilient_parsing=True)
    for name in COMMANDS:
        cmd = cli.get_command(ctx, name)
        reads = re.search(r"\b\w+\.(config|lock)\b", inspect.getsource(inspect.getmodule(cmd.callback)))
        has = {p.name for p in cmd.params} >= {"config", "lock"}
        assert bool(reads) == has, f"{name}: reads the project={bool(reads)}, takes --config/--lock={has}"


@pytest.mark.parametrize("command", [["add", "--force"], ["update", "--dry-run"]])
def test_add_and_update_take_config_and_lock_after_their_name(project, tmp_path, command):
    """`pylmserv add --config X` failed with "No such option" (issue 19)."""
    proj, _, _ = project
    lock = tmp_path / "other.lock"
    args = [*command, "--config", proj / "pylmserv.toml", "--lock", lock, "--json"]
    if command[0] == "add":
        args += ["--via", "python", "--name", "m", (proj / "pylmserv.toml").as_uri()]
    proc = run_cli(*args, cwd=tmp_path)
    assert "No such option" not in proc.stderr
    assert proc.returncode in (0, 1, 2, 3, 4), proc.stderr


def test_every_json_answer_is_printed_in_the_one_style(project, tmp_path, home):
    """One emitter: indent 2, sorted keys, for every command's --json document."""
    proj, _, _ = project
    for args in (["list", "--json"], ["doctor", "--json"], ["gc", "--dry-run", "--json"], ["verify", "--json"]):
        proc = run_cli(*args, "--config", proj / "pylmserv.toml", cwd=tmp_path) if args[0] in ("list", "doctor") \
            else run_cli(*args, cwd=tmp_path)
        doc = json.loads(proc.stdout)
        assert proc.stdout == json.dumps(doc, indent=2, sort_keys=True) + "\n", args


# -- hash ---------------------------------------------------------------------------------

def test_hash_md5_and_hex_base64_formats_match_hashlib(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(b"pylmserv" * 1000)
    md5 = hashlib.md5(f.read_bytes()).digest()
    sha = hashlib.sha256(f.read_bytes()).digest()
    out = lambda *a: run_cli("hash", *a, f, check=True).stdout.strip()  # noqa: E731
    assert out("--type", "md5", "--format", "hex") == md5.hex()
    assert out("--type", "md5", "--format", "base64") == base64.b64encode(md5).decode()
    assert out("--type", "md5") == "md5-" + base64.b64encode(md5).decode()
    assert out("--format", "hex") == sha.hex()
    assert out("--format", "base64") == base64.b64encode(sha).decode()


# -- -q --------------------------------------------------------------------------------------

def test_quiet_leaves_only_errors_on_stderr(project, tmp_path, home):
    proj, www, base = project
    data = write_gguf(www / "q.gguf").read_bytes()
    url = f"{base}/q.gguf"
    loud = run_cli("fetch", url, "--sha256", Hash.of_bytes(data).hex, "--no-progress", cwd=tmp_path)
    assert loud.returncode == 0 and "verified sha256" in loud.stderr
    other = write_gguf(www / "n.gguf", pad=4096).read_bytes()
    assert other != data
    quiet = run_cli("-q", "fetch", f"{base}/n.gguf", "--sha256", Hash.of_bytes(other).hex, "--no-progress",
                    cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""
    bad = run_cli("-q", "fetch", url, "--sha256", Hash.of_bytes(b"other").hex, "--no-progress", cwd=tmp_path)
    assert bad.returncode == 4 and bad.stderr.startswith("error:")


# -- prefetch --refresh and --via from the CLI ------------------------------------------------

def test_prefetch_refresh_refetches_what_plain_prefetch_keeps(project):
    proj, www, _ = project
    run_cli("prefetch", "--via", "python", cwd=proj, check=True)
    lock = proj / "pylmserv.lock"
    before = lock.read_bytes()
    (www / "m.gguf").write_bytes(b"GGUF" + bytes(99) + b"!")  # same URL, new bytes upstream
    again = run_cli("prefetch", "--via", "python", cwd=proj, check=True)
    assert "already up to date" in again.stderr and lock.read_bytes() == before  # no refetch
    refreshed = run_cli("prefetch", "--via", "python", "--refresh", cwd=proj, check=True)
    assert "written (1 changed)" in refreshed.stderr
    assert Hash.of_bytes(b"GGUF" + bytes(99) + b"!").sri in lock.read_text()


@pytest.mark.nix
@pytest.mark.parametrize("via", ["nix", "fod"])
def test_prefetch_via_nix_tools_from_the_cli(project, nix, via):
    proj, www, _ = project
    proc = run_cli("prefetch", "--via", via, "--json", cwd=proj)
    assert proc.returncode == 0, proc.stderr
    [change] = json.loads(proc.stdout)["changes"]
    want = subprocess.run(["nix-prefetch-url", "--type", "sha256", (www / "m.gguf").as_uri()],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert change["new"]["hash"] == Hash.parse(f"sha256:{want}").sri


# -- build options from the CLI (dry runs: the exact CMake lines) -----------------------------

def _build_project(tmp_path):
    from tests.test_build_cli import project as build_project

    return build_project(tmp_path)


def test_build_portable_and_gpu_targets_reach_cmake(tmp_path, home):
    config, lock = _build_project(tmp_path)
    env = {"PYLMSERV_HOME": str(home)}
    native = run_cli("--config", config, "--lock", lock, "build", "--dry-run", env=env)
    portable = run_cli("--config", config, "--lock", lock, "build", "--dry-run", "--portable", env=env)
    assert native.returncode == 0 and portable.returncode == 0, portable.stderr
    assert "-DGGML_NATIVE=ON" in native.stdout and "-DGGML_NATIVE=OFF" in portable.stdout
    rocm = run_cli("--config", config, "--lock", lock, "build", "--dry-run", "--json", "--backend", "rocm",
                   "--gpu-targets", "gfx1100;gfx90a", env=env)
    assert rocm.returncode == 0, rocm.stderr
    configure = json.loads(rocm.stdout)["commands"][0]
    assert "-DGGML_HIP=ON" in configure and "gfx1100;gfx90a" in configure


def test_build_force_ignores_an_up_to_date_stamp(tmp_path, home):
    """--force from the CLI: a stamped, up-to-date build is rebuilt (it goes on to fetch the
    source, unreachable here, and says so) where the plain command is a cache hit."""
    from pylmserv.builders import LlamaCppBuild
    from pylmserv.builders.llama_cpp import Request
    from pylmserv.store import records as stamps
    from tests.test_build_cli import standin_source

    config, lock = _build_project(tmp_path)
    b = LlamaCppBuild(Request(targets=("llama-server",)), config=config, lock=lock)
    (b.build_dir / "bin").mkdir(parents=True)
    out = b.build_dir / "bin" / "llama-server"
    out.write_text("#!/bin/sh\n")
    out.chmod(0o755)
    stamps.write_stamp(b.stamp_path, stamps.make_stamp(b.inputs, {"llama-server": out}))
    source = standin_source(b)
    args = ("--config", config, "--lock", lock, "build", "--json", "--target", "llama-server")
    env = {"PYLMSERV_HOME": str(home)}
    hit = run_cli(*args, env=env)
    assert hit.returncode == 0 and json.loads(hit.stdout)["cache_hit"] is True, hit.stderr
    source.rmdir()  # never fetched, as the lock's URL says
    forced = run_cli(*args, "--force", env=env)
    assert forced.returncode == 3, forced.stderr  # went past the stamp: the (unreachable) fetch failed
    assert "never-fetched.tar.gz" in forced.stderr


# -- Hub token fallback ------------------------------------------------------------------------

def test_hugging_face_hub_token_is_the_fallback_for_hf_token(home, tmp_path):
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    with serve_hub(token="hf_old_style") as hub:
        hub.add_file("org/gated", "m.gguf", data, lfs=True)
        env = {"PYLMSERV_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_TOKEN": ""}
        proc = run_cli("fetch", "hf://org/gated/m.gguf", "--no-progress",
                       env={**env, "HUGGING_FACE_HUB_TOKEN": "hf_old_style"}, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert hub.requests and all(auth == "Bearer hf_old_style" for _, _, auth in hub.requests)
        # HF_TOKEN, when set, wins over the old name.
        seen = len(hub.requests)
        proc = run_cli("fetch", "hf://org/gated/m.gguf@main", "--no-progress",
                       env={**env, "HF_TOKEN": "hf_wrong", "HUGGING_FACE_HUB_TOKEN": "hf_old_style"}, cwd=tmp_path)
        assert proc.returncode == 3
        assert {auth for _, _, auth in hub.requests[seen:]} == {"Bearer hf_wrong"}


# -- the library's lazy exports -----------------------------------------------------------------

def test_every_lazy_export_is_the_object_its_module_defines():
    """Each name of `pylmserv.__all__` resolves, in a fresh interpreter that imported only
    `pylmserv`, to the very object of the module that owns it (and pulls no heavy import)."""
    import pylmserv

    names = [n for n in pylmserv.__all__ if n != "__version__"]
    assert len(names) == 9
    code = ("import importlib, json, sys, pylmserv\n"
            "heavy = sorted(m for m in ('requests', 'tqdm', 'urllib3') if m in sys.modules)\n"
            f"out = {{'heavy': heavy}}\n"
            f"for n in {names!r}:\n"
            "    obj = getattr(pylmserv, n)\n"
            "    out[n] = [obj.__module__, obj.__qualname__]\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seen = json.loads(proc.stdout)
    assert seen.pop("heavy") == []
    for name in names:
        owner = importlib.import_module(pylmserv._API[name])
        obj = getattr(owner, name)
        assert seen[name] == [obj.__module__, obj.__qualname__], name
        assert getattr(pylmserv, name) is obj
    with pytest.raises(AttributeError):
        pylmserv.no_such_name  # noqa: B018
