"""`pylmserv list`: catalog entries, locked or not, fetched (path, size), built (backend, path).

Fetched entries come from a real `pylmserv fetch` over a loopback HTTP server; built
entries from the builder's own install functions (fast) and, in the slow test, from the
session's real llama.cpp build.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


def tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A small valid GGUF (one f32 tensor) written with the gguf package."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"list-test-{seed}")
    w.add_tensor("t", np.random.default_rng(seed).standard_normal((16, 16)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def project_with_model(tmp_path: Path, url: str, model: Path, name: str = "tiny") -> Path:
    """A copy of the default catalog plus [models.NAME] pinned to `model` at `url`."""
    from pylmserv.pins.config import LockEntry, load_lock
    from pylmserv.core.hashing import file_hash

    d = tmp_path / "project"
    d.mkdir(exist_ok=True)
    cfg = d / "pylmserv.toml"
    cfg.write_text((REPO / "pylmserv.toml").read_text()
                   + f'\n[models.{name}]\nurl = "{url}"\ndescription = "a test model"\n')
    lock = load_lock(REPO / "pylmserv.lock")
    lock = lock.with_entry(LockEntry("models", name, url, file_hash(model), "flat", size=model.stat().st_size))
    lock.write(d / "pylmserv.lock")
    return cfg


def entries_json(*args, **kw):
    proc = run_cli(*args, "list", "--json", **kw)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    return data, {e["name"]: e for e in data["entries"]}


def test_list_default_catalog_empty_store(home):
    data, by = entries_json(cwd=REPO)
    assert data["config"] == str(REPO / "pylmserv.toml")
    from pylmserv.pins.config import load_lock

    pinned = load_lock(REPO / "pylmserv.lock").models["stories15m"]
    assert by["stories15m"]["locked"] is True
    assert by["stories15m"]["size"] == pinned.size and by["stories15m"]["pin"] == pinned.hash.hex
    assert by["gemma-2b"]["locked"] is False and by["gemma-2b"]["pin"] is None  # unpinned on purpose
    assert by["llama-cpp"]["kind"] == "source" and by["llama-cpp"]["pin"] == "b9941"
    assert by["cosmocc-3_3_6"]["pin"] == "3.3.6"
    for e in data["entries"]:
        assert set(e) == {"kind", "name", "description", "locked", "pin", "size", "drift", "fetched", "built"}
        assert e["drift"] == []  # the packaged lock pins what the packaged config asks
        assert e["fetched"] is None and e["built"] == []
    assert not home.exists()  # listing never creates the store


def test_list_shows_fetched_model_and_stale(tmp_path, home, http_dir):
    root, base = http_dir
    model = tiny_gguf(root / "tiny.gguf")
    cfg = project_with_model(tmp_path, f"{base}/tiny.gguf", model)
    proc = run_cli("--config", cfg, "fetch", "tiny", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    _, by = entries_json("--config", cfg)
    fetched = by["tiny"]["fetched"]
    assert fetched["path"] == str(home / "models" / "tiny" / "tiny.gguf")
    assert fetched["size"] == model.stat().st_size and fetched["stale"] is False
    assert by["tiny"]["description"] == "a test model"

    # The lock now pins other bytes (a new upload): list says the store copy is stale.
    other = tiny_gguf(tmp_path / "other.gguf", seed=1)
    cfg2 = project_with_model(tmp_path, f"{base}/tiny.gguf", other)
    _, by = entries_json("--config", cfg2)
    assert by["tiny"]["fetched"]["stale"] is True
    proc = run_cli("--config", cfg2, "list")
    assert "[stale: the lock pins other bytes; run `pylmserv fetch tiny`]" in proc.stdout  # the table pipes


def test_list_shows_builds(tmp_path, home):
    """A build installed with the builder's own functions appears under its source."""
    from pylmserv.store.installs import install_files, point_current

    out = tmp_path / "out"
    out.mkdir()
    server = out / "llama-server"
    server.write_bytes(b"\x7fELF")
    server.chmod(0o755)
    prefix = home / "bin" / "llama.cpp-cpu" / "0123456789abcdef"
    install_files({"llama-server": server}, prefix)
    point_current(prefix)
    _, by = entries_json(cwd=REPO)
    assert by["llama-cpp"]["built"] == [{"engine": "llama.cpp", "backend": "cpu", "path": str(prefix),
                                         "binaries": ["llama-server"]}]
    proc = run_cli("list", cwd=REPO)
    assert f"built llama.cpp cpu: {prefix}" in proc.stdout and proc.stderr == ""


def test_list_bad_config(tmp_path, home):
    bad = tmp_path / "pylmserv.toml"
    bad.write_text("[models.x]\nurl = 3\n")
    proc = run_cli("--config", bad, "list")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_list_shows_the_real_build():
    from tests.support import llama_source

    built = llama_source.built_llama_cpp()
    proc = run_cli("--config", built["config"], "--lock", built["lock"], "list", "--json",
                   env={"PYLMSERV_HOME": str(llama_source.PERSISTENT_HOME)})
    by = {e["name"]: e for e in json.loads(proc.stdout)["entries"]}
    (cpu,) = [b for b in by["llama-cpp"]["built"] if b["backend"] == "cpu"]
    assert "llama-server" in cpu["binaries"]
    assert Path(cpu["path"], "llama-server").exists()
    assert by["llama-cpp"]["fetched"]["path"]  # the verified source tree in the store
