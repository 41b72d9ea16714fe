"""One rule per decision in pins/: the Nix cross-check under --via auto, one reading of
the Hub (URL builder, LFS metadata, error -> exit code, no-metadata fallback) for prefetch
and fetch alike, one drift comparator for doctor / prefetch --check / list."""
from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pylmserv.core.errors import UsageError, VerificationError
from pylmserv.core.hashing import Hash
from pylmserv.pins.config import load_config
from pylmserv.pins.drift import config_drift
from pylmserv.pins.lock import load_lock
from pylmserv.pins.prefetch import prefetch
from tests.conftest import run_cli
from tests.support.hubstub import serve_hub
from tests.test_prefetch import prefetch_log
from tests.test_gguf import write_gguf

BODY = b"the real file\n" * 100


@contextlib.contextmanager
def picky_server():
    """A server that answers pylmserv but refuses Nix's fetcher (User-Agent curl/Nix): the
    kind of input Python accepts and Nix rejects. Yields (base URL, seen User-Agents)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            ua = self.headers.get("User-Agent", "")
            seen.append(ua)
            if "Nix" in ua or "curl" in ua:
                body = b"forbidden"
                self.send_response(403)
            else:
                body = BODY
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.nix
def test_auto_never_writes_a_pin_nix_refused(tmp_path, nix, home):
    with picky_server() as (base, seen):
        cfg = tmp_path / "pylmserv.toml"
        cfg.write_text(f'[models.m]\nurl = "{base}/m.gguf"\n')
        with pytest.raises(VerificationError) as exc:
            prefetch(config=cfg, via="auto")
        assert exc.value.exit_code == 4
        msg = exc.value.message
        assert Hash.of_bytes(BODY).sri in msg and "nix-prefetch-url refused" in msg and "forbidden" in msg
        assert not (tmp_path / "pylmserv.lock").exists()
        assert any("Nix" in ua or "curl" in ua for ua in seen)  # the cross-check really ran
        # The CLI: exit 4, one line, both answers.
        proc = run_cli("--config", cfg, "prefetch", env={"PYLMSERV_HOME": str(home)})
        assert proc.returncode == 4 and "refused" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "pylmserv.lock").exists()
        # Only an explicit --via python skips the cross-check.
        prefetch(config=cfg, via="python")
        assert load_lock(tmp_path / "pylmserv.lock").models["m"].hash == Hash.of_bytes(BODY)


def test_auto_without_nix_on_path_pins_and_says_so(tmp_path, monkeypatch, caplog, home):
    with picky_server() as (base, seen):
        cfg = tmp_path / "pylmserv.toml"
        cfg.write_text(f'[models.m]\nurl = "{base}/m.gguf"\n')
        empty = tmp_path / "bin"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
        with prefetch_log(caplog):
            prefetch(config=cfg, via="auto")
        assert "not cross-checked: nix-prefetch-url is not on PATH" in caplog.text
        assert load_lock(tmp_path / "pylmserv.lock").models["m"].hash == Hash.of_bytes(BODY)


# -- the Hub: one reading for prefetch and fetch ---------------------------------------------

def _cli_env(hub, home):
    return {"HF_ENDPOINT": hub.url, "PYLMSERV_HOME": str(home)}


def test_same_hub_error_same_exit_code_in_prefetch_and_fetch(tmp_path, home):
    with serve_hub() as hub:
        hub.add_file("org/repo", "m.gguf", write_gguf(tmp_path / "m.gguf").read_bytes(), lfs=True)
        cfg = tmp_path / "pylmserv.toml"
        cfg.write_text('[models.m]\nhf = "org/repo"\nfile = "nope.gguf"\n')
        pre = run_cli("--config", cfg, "prefetch", "--via", "python", env=_cli_env(hub, home))
        got = run_cli("fetch", "hf://org/repo/nope.gguf", env=_cli_env(hub, home))
        assert pre.returncode == got.returncode == 2, (pre.stderr, got.stderr)
        assert "'nope.gguf' not found in org/repo" in pre.stderr and "'nope.gguf' not found in org/repo" in got.stderr


@pytest.mark.parametrize("lfs, needle", [
    ({"oid": "../../etc/passwd", "size": 3}, "is not a sha256"),
    ({"oid": "a" * 64, "size": -5}, "is not a byte count"),
    ({"oid": "a" * 64, "size": 2 ** 63}, "is not a byte count"),
    ({"oid": "a" * 64, "size": "12"}, "is not a byte count"),
    ({"oid": "a" * 64, "size": True}, "is not a byte count"),
    ("not a table", "malformed LFS metadata"),
])
def test_hostile_hub_metadata_refused_alike_by_prefetch_and_fetch(tmp_path, home, lfs, needle):
    with serve_hub() as hub:
        hub.add_file("org/repo", "m.gguf", b"x" * 2000, lfs=True)
        real = hub.info
        hub.info = lambda repo, path, data: {**real(repo, path, data), "lfs": lfs}
        cfg = tmp_path / "pylmserv.toml"
        cfg.write_text('[models.m]\nhf = "org/repo"\nfile = "m.gguf"\n')
        pre = run_cli("--config", cfg, "prefetch", "--via", "python", env=_cli_env(hub, home))
        got = run_cli("fetch", "hf://org/repo/m.gguf", env=_cli_env(hub, home))
        assert pre.returncode == got.returncode == 3, (pre.stderr, got.stderr)
        assert needle in pre.stderr and needle in got.stderr
        assert not (tmp_path / "pylmserv.lock").exists()


def test_hub_without_metadata_api_falls_back_in_prefetch_and_fetch(tmp_path, home, monkeypatch):
    data = write_gguf(tmp_path / "m.gguf", pad=4096).read_bytes()
    with serve_hub() as hub:
        hub.add_file("org/repo", "m.gguf", data, lfs=True)
        hub.fail("paths-info", 404, times=1000)
        hub.fail("/tree/", 404, times=1000)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        cfg = tmp_path / "pylmserv.toml"
        cfg.write_text('[models.m]\nhf = "org/repo"\nfile = "m.gguf"\n')
        prefetch(config=cfg, via="python")  # downloads and hashes instead
        assert load_lock(tmp_path / "pylmserv.lock").models["m"].hash == Hash.of_bytes(data)
        from pylmserv.app.fetch_models import fetch

        with pytest.raises(UsageError, match="no metadata API"):
            fetch(["hf://org/repo/m.gguf"], progress=False)
        lock = tmp_path / "tofu.lock"
        [r] = fetch(["hf://org/repo/m.gguf"], progress=False, trust_on_first_use=True, lock=lock)
        assert r.sha256 == Hash.of_bytes(data)


def test_one_quoted_resolve_url_for_odd_file_names(tmp_path, home, monkeypatch):
    data = write_gguf(tmp_path / "m.gguf", pad=4096).read_bytes()
    with serve_hub() as hub:
        commit = hub.add_file("org/repo", "dir/a b#c%d?.gguf", data, lfs=True)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        cfg = tmp_path / "pylmserv.toml"
        cfg.write_text('[models.m]\nhf = "org/repo"\nfile = "dir/a b#c%d?.gguf"\n')
        prefetch(config=cfg, via="python")
        pin = load_lock(tmp_path / "pylmserv.lock").models["m"]
        assert pin.url == f"{hub.url}/org/repo/resolve/{commit}/dir/a%20b%23c%25d%3F.gguf"
        from pylmserv.app.fetch_models import fetch

        [r] = fetch(["m"], config=cfg, lock=tmp_path / "pylmserv.lock", progress=False)
        assert r.path.read_bytes() == data


# -- drift: one comparator ------------------------------------------------------------------

def test_config_drift_tags_are_not_false_alarms_and_changed_revisions_are_caught(tmp_path):
    h = Hash.of_bytes(b"x").sri
    commit = "c" * 40
    (tmp_path / "pylmserv.toml").write_text('[models.m]\nhf = "o/r"\nfile = "f.gguf"\nrevision = "v1"\n')
    (tmp_path / "pylmserv.lock").write_text(
        f'version = 2\n[models.m]\ntype = "hf"\nhf = "o/r"\nfile = "f.gguf"\nrevision = "v1"\nrev = "{commit}"\n'
        f'url = "https://huggingface.co/o/r/resolve/{commit}/f.gguf"\nhash = "{h}"\nmode = "flat"\n')
    cfg, lock = load_config(tmp_path / "pylmserv.toml"), load_lock(tmp_path / "pylmserv.lock")
    assert config_drift(cfg.models["m"], lock.models["m"]) == []  # a tag resolved to its commit: in sync
    (tmp_path / "pylmserv.toml").write_text('[models.m]\nhf = "o/r"\nfile = "f.gguf"\nrevision = "v2"\n')
    cfg = load_config(tmp_path / "pylmserv.toml")
    assert config_drift(cfg.models["m"], lock.models["m"]) == ["config revision v2 but lock revision v1"]
    # doctor says the same thing, from the same comparator.
    from pylmserv.app.doctor import check_lock

    check = check_lock(tmp_path / "pylmserv.toml", tmp_path / "pylmserv.lock")
    assert check.status == "warn" and "model m: config revision v2 but lock revision v1" in check.detail
