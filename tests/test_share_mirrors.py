"""Mirrors, end to end: two stores (two PYLMSERV_HOMEs) stand in for two machines. Store A
fetches from an nginx origin; the origin is stopped; store B gets the model through A's
store served read-only by nginx, and through a real registry (docker-registry), every byte
checked; lying mirrors are named and never stored; offline is tested with no network at all
(`unshare -n`)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.core.hashing import Hash
from pylmserv.transfer import oci
from tests.conftest import run_cli
from tests.support.registry import nginx_dir, registry, write_auth_file

PASSWORD = "mirror-Pw-9q!do-not-leak"


def model_bytes(seed: int, size: int = 3 * (1 << 20) + 123) -> bytes:
    block = b"".join(hashlib.sha256(f"{seed}-{i}".encode()).digest() for i in range(2048))
    body = (block * (size // len(block) + 1))[: size - 24]
    return b"GGUF" + (3).to_bytes(4, "little") + bytes(16) + body  # version 3, no tensors, no kv


@pytest.fixture
def world(tmp_path):
    """An nginx origin serving two models, a project locking both (prefetch), two homes."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "m.gguf").write_bytes(model_bytes(1))
    (www / "n.gguf").write_bytes(model_bytes(2, 1_000_000))
    proj = tmp_path / "proj"
    proj.mkdir()
    with nginx_dir(www, tmp_path / "origin-nginx") as origin:
        (proj / "pylmserv.toml").write_text(f'[models.m]\nurl = "{origin.url}/m.gguf"\n'
                                            f'[models.n]\nurl = "{origin.url}/n.gguf"\n')
        env = {"PYLMSERV_HOME": str(tmp_path / "A")}
        run_cli("prefetch", env=env, cwd=proj, check=True)
        r = run_cli("fetch", "m", "n", env=env, cwd=proj, check=True)
        yield {"tmp": tmp_path, "proj": proj, "origin": origin, "A": tmp_path / "A", "B": tmp_path / "B",
               "www": www, "m": Hash("sha256", hashlib.sha256((www / "m.gguf").read_bytes()).digest()),
               "n": Hash("sha256", hashlib.sha256((www / "n.gguf").read_bytes()).digest())}


def fetch_b(w, *items, mirrors=None, extra_env=None, verbose=False):
    env = {"PYLMSERV_HOME": str(w["B"]), "REGISTRY_AUTH_FILE": str(w["tmp"] / "auth.json"),
           "HOME": str(w["tmp"] / "userhome")}
    if mirrors is not None:
        env["PYLMSERV_MIRRORS"] = mirrors
    env.update(extra_env or {})
    return run_cli(*(["-v"] if verbose else []), "fetch", *items, env=env, cwd=w["proj"])


def stored(home: Path) -> set:
    d = home / "blobs" / "sha256"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def tmp_bytes(home: Path) -> bytes:
    """Everything under the home's tmp/ (partials, states), concatenated."""
    out = b""
    for p in sorted((home / "tmp").rglob("*")) if (home / "tmp").exists() else []:
        if p.is_file():
            out += p.read_bytes()
    return out


def lying_store(tmp: Path, hashes) -> Path:
    """A store-shaped directory whose blobs have the right names and sizes but other bytes."""
    root = tmp / "liar-blobs"
    for h, size in hashes:
        p = root / "sha256" / h.hex
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"GGUF" + b"\x5a" * (size - 4))
    return root


def test_served_store_is_a_mirror_with_the_origin_stopped(world):
    w = world
    w["origin"].stop()
    size = (w["www"] / "m.gguf").stat().st_size
    liar = lying_store(w["tmp"], [(w["m"], size)])
    with nginx_dir(w["A"] / "blobs", w["tmp"] / "store-nginx") as served, \
            nginx_dir(liar, w["tmp"] / "liar-nginx") as lying:
        r = fetch_b(w, "m", mirrors=f"{lying.url} {served.url}")
        assert r.returncode == 0, r.stderr
        assert f"mirror {lying.url} sent other bytes" in r.stderr
        assert f"from mirror {served.url}" in r.stderr
        assert (w["B"] / "blobs" / "sha256" / w["m"].hex).read_bytes() == (w["www"] / "m.gguf").read_bytes()
        assert b"\x5a" * 4096 not in tmp_bytes(w["B"])  # nothing the liar sent was kept
        # Config mirrors work too, and the variable wins over them.
        shutil.rmtree(w["B"])
        toml = w["proj"] / "pylmserv.toml"
        toml.write_text(f'mirrors = ["{served.url}"]\n' + toml.read_text())
        r = fetch_b(w, "n")
        assert r.returncode == 0 and f"from mirror {served.url}" in r.stderr, r.stderr
        r = fetch_b(w, "m", mirrors=lying.url)  # the variable replaces the config's list: only the liar
        assert r.returncode != 0


def test_every_source_failing_names_each_and_keeps_nothing(world):
    w = world
    w["origin"].stop()
    size = (w["www"] / "m.gguf").stat().st_size
    liar = lying_store(w["tmp"], [(w["m"], size)])
    empty = w["tmp"] / "empty-blobs"
    empty.mkdir()
    with nginx_dir(liar, w["tmp"] / "liar-nginx") as lying, nginx_dir(empty, w["tmp"] / "empty-nginx") as hollow:
        r = fetch_b(w, "m", mirrors=f"{lying.url} {hollow.url}")
    assert r.returncode == 3, r.stderr  # the origin's verdict: unreachable
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    line = errors[0]
    assert "every source failed" in line and f"mirror {lying.url} (other bytes)" in line
    assert f"mirror {hollow.url} (HTTP 404" in line and f"origin {w['origin'].url}/m.gguf" in line
    assert stored(w["B"]) == set()
    assert not (w["B"] / "models" / "m").exists()
    assert b"\x5a" * 4096 not in tmp_bytes(w["B"])


def test_registry_is_a_mirror_with_auth(world):
    w = world
    w["origin"].stop()
    with registry(w["tmp"] / "reg", auth="htpasswd", users={"carol": PASSWORD}) as reg:
        write_auth_file(w["tmp"] / "auth.json", reg.host, "carol", PASSWORD)
        ref = oci.OciRef.parse(f"oci://{reg.host}/team/models")
        env = {"REGISTRY_AUTH_FILE": str(w["tmp"] / "auth.json"), "HOME": str(w["tmp"] / "userhome")}
        client = oci.Registry(ref, env=env)
        for name, h in (("m", w["m"]), ("n", w["n"])):
            client.push_blob(w["A"] / "blobs" / "sha256" / h.hex, h)
        r = fetch_b(w, "m", "n", mirrors=str(ref), verbose=True)
        assert r.returncode == 0, r.stderr
        assert f"from mirror {ref}" in r.stderr
        assert stored(w["B"]) == {w["m"].hex, w["n"].hex}
        assert PASSWORD not in r.stderr + r.stdout

        # A registry that lost the blob (404) falls through to the next source.
        shutil.rmtree(w["B"])
        with nginx_dir(w["A"] / "blobs", w["tmp"] / "store-nginx") as served:
            other = f"oci://{reg.host}/team/empty"
            r = fetch_b(w, "m", mirrors=f"{other} {served.url}")
        assert r.returncode == 0 and f"from mirror {served.url}" in r.stderr, r.stderr


def test_registry_sending_other_bytes_is_skipped(world, tmp_path):
    """A registry whose storage was tampered with: the blob under the digest is other bytes."""
    w = world
    with registry(w["tmp"] / "reg") as reg:
        ref = oci.OciRef.parse(f"oci://{reg.host}/team/models")
        oci.Registry(ref).push_blob(w["A"] / "blobs" / "sha256" / w["m"].hex, w["m"])
        data = next((w["tmp"] / "reg" / "data").rglob(f"blobs/sha256/{w['m'].hex[:2]}/{w['m'].hex}/data"))
        data.write_bytes(b"GGUF" + b"\x5a" * (data.stat().st_size - 4))
        r = fetch_b(w, "m", mirrors=str(ref))  # the origin is still up
    assert r.returncode == 0, r.stderr
    assert f"mirror {ref} sent other bytes" in r.stderr
    assert (w["B"] / "blobs" / "sha256" / w["m"].hex).read_bytes() == (w["www"] / "m.gguf").read_bytes()
    assert b"\x5a" * 4096 not in tmp_bytes(w["B"])


def _unshare(args, env, cwd):
    full = dict(os.environ)
    full.update(env)
    return subprocess.run(["unshare", "-n", sys.executable, "-m", "pylmserv", *args], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_offline_in_a_network_namespace(world):
    w = world
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("unshare -n is needed (root, util-linux)")
        pytest.skip("unshare -n not permitted here")
    env = {"PYLMSERV_HOME": str(w["B"]), "PYLMSERV_MIRRORS": f"{w['origin'].url} oci://127.0.0.1:9/x"}
    # Nothing in B: offline names every missing file at once, and asks no one.
    r = _unshare(["fetch", "--offline", "m", "n"], env, w["proj"])
    assert r.returncode == 2, r.stderr
    assert "2 file(s) are not in the store" in r.stderr and "m: m.gguf" in r.stderr and "n: n.gguf" in r.stderr
    # A file:// mirror (another store on a disk) is no network: offline may use it.
    env["PYLMSERV_MIRRORS"] = (w["A"] / "blobs").as_uri()
    r = _unshare(["fetch", "m"], {**env, "PYLMSERV_OFFLINE": "1"}, w["proj"])
    assert r.returncode == 0, r.stderr
    # What is in the store is served offline with no network at all.
    del env["PYLMSERV_MIRRORS"]
    r = _unshare(["fetch", "--offline", "m", "n"], env, w["proj"])
    assert r.returncode == 2 and "1 file(s)" in r.stderr and "n: n.gguf" in r.stderr, r.stderr
    r = _unshare(["fetch", "--offline", "m"], env, w["proj"])
    assert r.returncode == 0, r.stderr


def test_mirror_config_errors(tmp_path):
    proj = tmp_path / "p"
    proj.mkdir()
    (proj / "pylmserv.toml").write_text('mirrors = ["ftp://x/y"]\n')
    r = run_cli("fetch", "m", cwd=proj, env={"PYLMSERV_HOME": str(tmp_path / "h")})
    assert r.returncode == 2 and "unsupported mirror" in r.stderr
    (proj / "pylmserv.toml").write_text('[models.m]\nurl = "http://127.0.0.1:9/m.gguf"\nsha256 = "'
                                        + "0" * 64 + '"\n')
    r = run_cli("fetch", "m", cwd=proj, env={"PYLMSERV_HOME": str(tmp_path / "h"),
                                              "PYLMSERV_MIRRORS": "oci://user:Pw-secret@host/repo"})
    assert r.returncode == 2 and "Pw-secret" not in r.stderr and "carries credentials" in r.stderr, r.stderr


def test_a_mirror_cut_midway_is_resumed_not_restarted(world, server):
    """The download engine runs against content-addressed mirrors as against origins: a
    connection cut in the middle resumes from where it stopped (-c 1: one stream, so the
    bytes on the wire are easy to count)."""
    w = world
    w["origin"].stop()
    data = (w["www"] / "m.gguf").read_bytes()
    server.add(f"/mirror/sha256/{w['m'].hex}", data)
    server.faults.cut_at, server.faults.cut_times = len(data) // 2, 1
    env = {"PYLMSERV_HOME": str(w["B"]), "PYLMSERV_MIRRORS": server.url("/mirror")}
    r = run_cli("fetch", "-c", "1", "m", env=env, cwd=w["proj"])
    assert r.returncode == 0, r.stderr
    assert f"from mirror {server.url('/mirror')}" in r.stderr
    assert (w["B"] / "blobs" / "sha256" / w["m"].hex).read_bytes() == data
    assert server.bytes_sent < len(data) * 1.1  # the second half once, not the file twice
