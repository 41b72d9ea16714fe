"""`pylmserv push`, `export` and `import` against real tools: docker-registry (htpasswd
auth) takes the ModelPack artifacts, skopeo reads every manifest pushed and exported and
copies them (what skopeo pushes, pylmserv pulls), a second store gets every model through
the registry with the origin stopped, and an export is imported with no network at all.

`skopeo inspect` without --raw refuses every non-image artifact by design (containers/image:
"unsupported image-specific operation on artifact"); `inspect --raw` and `inspect --config
--raw` read the manifest and the ModelPack config, which is what is checked here."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pylmserv.app import share
from tests.conftest import run_cli
from tests.support.registry import need, registry, write_auth_file
from tests.test_share_mirrors import PASSWORD, fetch_b, stored, world  # noqa: F401 - world is a fixture


def skopeo(*args, auth=None):
    cmd = [need("skopeo"), *args]
    if auth:
        cmd[2:2] = []  # keep the order: the subcommand first
    env = dict(os.environ)
    if auth:
        env["REGISTRY_AUTH_FILE"] = str(auth)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def run_a(w, *args):
    env = {"PYLMSERV_HOME": str(w["A"]), "REGISTRY_AUTH_FILE": str(w["tmp"] / "auth.json"),
           "HOME": str(w["tmp"] / "userhome")}
    return run_cli(*args, env=env, cwd=w["proj"])


def test_push_skopeo_reads_and_copies_and_a_second_store_pulls(world):
    w = world
    with registry(w["tmp"] / "reg", auth="htpasswd", users={"dana": PASSWORD}) as reg:
        auth = write_auth_file(w["tmp"] / "auth.json", reg.host, "dana", PASSWORD)
        to = f"oci://{reg.host}/team/models"
        r = run_a(w, "push", "m", "n", "--to", to, "--json")
        assert r.returncode == 0, r.stderr
        pushed = json.loads(r.stdout)
        assert [p["name"] for p in pushed] == ["m", "n"] and pushed[0]["uploaded"] > 0
        assert PASSWORD not in r.stderr + r.stdout
        # Pushing again sends no blob (the registry has them) and gives the same digest.
        again = json.loads(run_a(w, "push", "m", "--to", to, "--json", "--chunk-size", "1048576").stdout)
        assert again[0]["uploaded"] == 0 and again[0]["digest"] == pushed[0]["digest"]

        for p, h in zip(pushed, (w["m"], w["n"])):
            src = f"docker://{reg.host}/team/models:{p['name']}"
            raw = skopeo("inspect", "--raw", "--tls-verify=false", src, auth=auth)
            assert raw.returncode == 0, raw.stderr
            manifest = json.loads(raw.stdout)
            assert "sha256:" + hashlib.sha256(raw.stdout.encode()).hexdigest() == p["digest"]
            assert manifest["artifactType"] == share.ARTIFACT_TYPE
            assert manifest["config"]["mediaType"] == share.CONFIG_TYPE
            layer = manifest["layers"][0]
            assert layer["mediaType"] == share.WEIGHT_RAW and layer["digest"] == f"sha256:{h.hex}"
            assert layer["annotations"][share.FILEPATH] == f"{p['name']}.gguf"
            entry = json.loads(manifest["annotations"][share.LOCK_ANNOTATION])
            assert entry["hash"] == h.sri and entry["name"] == p["name"]
            cfg = skopeo("inspect", "--config", "--raw", "--tls-verify=false", src, auth=auth)
            assert json.loads(cfg.stdout)["modelfs"] == {"type": "layers", "diffIds": [f"sha256:{h.hex}"]}

        # skopeo copies the artifacts into another repository; pylmserv pulls what skopeo pushed.
        for name in ("m", "n"):
            cp = skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                        f"docker://{reg.host}/team/models:{name}", f"docker://{reg.host}/copied/models:{name}",
                        auth=auth)
            assert cp.returncode == 0, cp.stderr
        w["origin"].stop()
        r = fetch_b(w, "m", "n", mirrors=f"oci://{reg.host}/copied/models")
        assert r.returncode == 0, r.stderr
        assert stored(w["B"]) == {w["m"].hex, w["n"].hex}
        assert (w["B"] / "models" / "m" / "m.gguf").read_bytes() == (w["www"] / "m.gguf").read_bytes()
        assert PASSWORD not in r.stderr


def test_push_refuses_what_is_not_in_the_store(world):
    w = world
    shutil.rmtree(w["A"] / "blobs")
    r = run_a(w, "push", "m", "--to", "oci://127.0.0.1:9/x")
    assert r.returncode == 2 and "not in the store" in r.stderr and "pylmserv fetch m" in r.stderr
    r = run_a(w, "push", "m", "--to", "oci://127.0.0.1:9/Bad")
    assert r.returncode == 2 and "bad repository name" in r.stderr


def _unshare(args, env, cwd):
    full = dict(os.environ)
    full.update(env)
    return subprocess.run(["unshare", "-n", sys.executable, "-m", "pylmserv", *args], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_export_skopeo_and_import_offline(world):
    w = world
    bundle = w["tmp"] / "models.oci.tar"
    r = run_a(w, "export", "m", "n", "-o", bundle, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["names"] == ["m", "n"]
    first = bundle.read_bytes()
    run_a(w, "export", "m", "n", "-o", bundle)
    assert bundle.read_bytes() == first  # no timestamps: the same lock gives the same file

    raw = skopeo("inspect", "--raw", f"oci-archive:{bundle}:m")
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["layers"][0]["digest"] == f"sha256:{w['m'].hex}"
    with registry(w["tmp"] / "reg") as reg:
        cp = skopeo("copy", "--dest-tls-verify=false", f"oci-archive:{bundle}:n", f"docker://{reg.host}/air/gap:n")
        assert cp.returncode == 0, cp.stderr
        back = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/air/gap:n")
        assert json.loads(back.stdout)["layers"][0]["digest"] == f"sha256:{w['n'].hex}"

    w["origin"].stop()
    env = {"PYLMSERV_HOME": str(w["B"])}
    r = _unshare(["import", str(bundle), "--json"], env, w["proj"])
    assert r.returncode == 0, r.stderr
    assert {i["name"] for i in json.loads(r.stdout)} == {"m", "n"}
    assert stored(w["B"]) >= {w["m"].hex, w["n"].hex}
    r = _unshare(["fetch", "--offline", "m", "n"], env, w["proj"])
    assert r.returncode == 0, r.stderr
    assert (w["B"] / "models" / "n" / "n.gguf").read_bytes() == (w["www"] / "n.gguf").read_bytes()


def _members(bundle: Path):
    with tarfile.open(bundle) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def _write(path: Path, members):
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)


def test_import_refuses_damaged_bundles_and_keeps_nothing(world):
    w = world
    bundle = w["tmp"] / "good.tar"
    assert run_a(w, "export", "m", "-o", bundle).returncode == 0
    members = _members(bundle)
    cases = {}
    # A flipped byte in the weights.
    flipped = []
    for m, data in members:
        if m.isfile() and m.size > 100000:
            data = data[:5000] + bytes([data[5000] ^ 1]) + data[5001:]
        flipped.append((m, data))
    cases["flipped"] = flipped
    # A cut file (copy interrupted).
    cut = w["tmp"] / "cut.tar"
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    # A missing weight blob.
    cases["missing"] = [(m, d) for m, d in members if not (m.isfile() and m.size > 100000)]
    # A member that would escape, and a symlink.
    evil = tarfile.TarInfo("../escape")
    evil.size = 3
    cases["escape"] = members + [(evil, b"bad")]
    link = tarfile.TarInfo(f"blobs/sha256/{'0' * 64}")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    cases["symlink"] = members + [(link, None)]
    paths = {"cut": cut}
    for name, ms in cases.items():
        paths[name] = w["tmp"] / f"{name}.tar"
        _write(paths[name], ms)
    env = {"PYLMSERV_HOME": str(w["B"])}
    for name, path in paths.items():
        r = run_cli("import", path, env=env, cwd=w["proj"])
        assert r.returncode == 4, (name, r.stderr)
        assert "nothing was imported" in r.stderr, (name, r.stderr)
        assert stored(w["B"]) == set(), name
        assert not (w["B"] / "models").exists() or not any((w["B"] / "models").iterdir()), name
        leftovers = [p for p in (w["B"] / "tmp").rglob("*") if p.is_file() and not p.name.endswith(".lock")] \
            if (w["B"] / "tmp").exists() else []
        assert leftovers == [], (name, leftovers)
    r = run_cli("import", bundle, env=env, cwd=w["proj"])
    assert r.returncode == 0 and stored(w["B"]) == {w["m"].hex}, r.stderr
