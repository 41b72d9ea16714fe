"""The typed, versioned lock (pylmserv.pins.lock): kinds, upgrade of a real version-1 lock,
refusal of a newer one, git_url/fetcher/shards written, and one read-merge-write path
(parallel prefetch processes all land)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.core.errors import ConfigError, UsageError
from pylmserv.core.hashing import Hash
from pylmserv.pins.lock import (LOCK_VERSION, ArchivePin, FilePin, GitPin, GithubPin, HfPin, LockEntry,
                                load_lock)
from pylmserv.pins.prefetch import prefetch
from tests.support import gitrepos
from tests.support.hubstub import serve_hub
from tests.test_gguf import write_gguf

DATA = Path(__file__).parent / "data"
V1 = DATA / "lock-v1.lock"  # the packaged lock exactly as the first landing wrote it


def test_real_v1_lock_is_upgraded_on_read_into_typed_pins(tmp_path):
    lock = load_lock(V1)
    assert lock.version == 1 and lock.needs_upgrade
    cosmo, llama = lock.sources["cosmocc-3_3_6"], lock.sources["llama-cpp"]
    assert type(cosmo) is FilePin and cosmo.version == "3.3.6" and cosmo.mode == "flat"
    assert type(llama) is GithubPin and (llama.owner, llama.repo, llama.ref) == ("ggml-org", "llama.cpp", "b9941")
    assert llama.git_url == "https://github.com/ggml-org/llama.cpp.git"  # v1 never wrote it
    assert lock.sources["llamafile"].cosmocc == "3.3.6"
    qwen = lock.models["qwen2_5-0_5b-instruct"]
    assert type(qwen) is HfPin and qwen.hf == "Qwen/Qwen2.5-0.5B-Instruct-GGUF" and qwen.size == 491400032
    # Same pins (url, hash, rev, size) as the v1 text says.
    import tomllib
    raw = tomllib.loads(V1.read_text())
    for kind in ("sources", "models"):
        for name, t in raw[kind].items():
            pin = getattr(lock, kind)[name]
            assert (pin.url, pin.hash.sri, pin.rev, pin.size) == (t["url"], t["hash"], t.get("rev"), t.get("size"))
    # Written back as version 2, and read back identical.
    out = lock.write(tmp_path / "pylmserv.lock")
    again = load_lock(out)
    assert again.version == LOCK_VERSION == 2 and not again.needs_upgrade
    assert again.sources == lock.sources and again.models == lock.models


def test_v1_git_and_url_archive_kinds_upgrade(tmp_path):
    h = Hash.of_bytes(b"x").sri
    p = tmp_path / "old.lock"
    p.write_text(f'version = 1\n[sources.g]\ntype = "git"\nurl = "https://example.org/r.git"\nrev = "{"a" * 40}"\n'
                 f'hash = "{h}"\nmode = "nar"\nref = "main"\nsubmodules = true\n'
                 f'[sources.z]\ntype = "url"\nunpack = true\nurl = "https://example.org/z.tar.gz"\nhash = "{h}"\nmode = "nar"\n'
                 f'[models.m]\nurl = "https://example.org/m.gguf"\nhash = "{h}"\nmode = "flat"\nsize = 3\n'
                 f'shards = [{{ file = "m-2.gguf", url = "https://example.org/m-2.gguf", hash = "{h}", size = 1 }}]\n')
    lock = load_lock(p)
    g, z, m = lock.sources["g"], lock.sources["z"], lock.models["m"]
    assert type(g) is GitPin and g.git_url == "https://example.org/r.git" and g.fetcher == "builtins.fetchGit"
    assert type(z) is ArchivePin
    assert type(m) is FilePin and m.shards[0].file == "m-2.gguf" and m.shards[0].size == 1


def test_newer_lock_version_refused_clearly(tmp_path):
    p = tmp_path / "pylmserv.lock"
    p.write_text(f"version = {LOCK_VERSION + 1}\n")
    with pytest.raises(ConfigError) as exc:
        load_lock(p)
    assert f"unsupported lock version {LOCK_VERSION + 1}" in exc.value.message and "newer pylmserv" in exc.value.message
    assert "Upgrade pylmserv" in exc.value.hint


@pytest.mark.parametrize("table, needle", [
    ('type = "git"\nurl = "u"\nmode = "nar"\nhash = "%s"\nfetcher = "curl"', "unknown fetcher"),
    ('type = "file"\nurl = "u"\nmode = "nar"\nhash = "%s"', "mode 'flat'"),
    ('type = "hf"\nurl = "u"\nmode = "flat"\nhash = "%s"\nbogus = 1', "unknown key(s) bogus"),
    ('type = "tarball"\nurl = "u"\nmode = "nar"\nhash = "%s"', "unknown pin type"),
    ('type = "hf"\nurl = "u"\nmode = "flat"\nhash = "%s"\nshards = [1]', "malformed shards"),
    ('type = "file"\nurl = "u"\nmode = "flat"\nhash = "%s"\nsize = -1', "non-negative"),
])
def test_v2_pins_are_checked_by_kind(tmp_path, table, needle):
    p = tmp_path / "pylmserv.lock"
    p.write_text("version = 2\n[models.m]\n" + table.replace("%s", Hash.of_bytes(b"").sri) + "\n")
    with pytest.raises(ConfigError) as exc:
        load_lock(p)
    assert needle in exc.value.message and "prefetch --refresh" in exc.value.hint


def test_legacy_constructor_still_builds_typed_pins():
    h = Hash.of_bytes(b"q")
    e = LockEntry("sources", "s", "https://x/a.zip", h, "flat", extra={"type": "url", "unpack": False, "version": "1"})
    assert type(e) is FilePin and e.get("version") == "1" and e.extra["type"] == "file"
    g = LockEntry("sources", "gh", "https://github.com/o/r/archive/x.tar.gz", h, "nar", rev="x",
                  extra={"type": "github", "owner": "o", "repo": "r"})
    assert type(g) is GithubPin and g.git_url == "https://github.com/o/r.git"


def test_git_pin_records_git_url_and_fetcher_and_the_flake_reads_git_url(tmp_path, gitenv):
    repo = gitrepos.make_repo(tmp_path / "r", {"a.txt": "1\n"})
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(f'[sources.r]\ntype = "git"\nurl = "{gitrepos.uri(repo)}"\nref = "main"\n')
    prefetch(config=cfg, via="python")
    text = (tmp_path / "pylmserv.lock").read_text()
    pin = load_lock(tmp_path / "pylmserv.lock").sources["r"]
    assert type(pin) is GitPin and pin.git_url == gitrepos.uri(repo) and pin.fetcher == "builtins.fetchGit"
    assert f'git_url = "{gitrepos.uri(repo)}"' in text and 'fetcher = "builtins.fetchGit"' in text


def test_prefetch_rewrites_a_v1_lock_as_v2_without_refetching(tmp_path, http_dir):
    www, base = http_dir
    (www / "a.bin").write_bytes(b"abc")
    h = Hash.of_bytes(b"abc")
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(f'[sources.a]\ntype = "url"\nurl = "{base}/a.bin"\n')
    lock = tmp_path / "pylmserv.lock"
    lock.write_text(f'version = 1\n[sources.a]\ntype = "url"\nunpack = false\nurl = "{base}/a.bin"\n'
                    f'hash = "{h.sri}"\nmode = "flat"\nsize = 3\n')
    (www / "a.bin").unlink()  # the pin is reused: no download needed to upgrade
    result = prefetch(config=cfg, via="python")
    assert result.written
    assert lock.read_text().splitlines()[1] == "version = 2"
    assert type(load_lock(lock).sources["a"]) is FilePin and load_lock(lock).sources["a"].hash == h


def test_hf_split_set_is_pinned_with_its_shards_and_fetch_needs_nothing_else(tmp_path, monkeypatch, home):
    """The hint `re-pin it with its shards: pylmserv prefetch --refresh` must work."""
    from pylmserv.app.fetch_models import fetch

    names = [f"big-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    shards = [write_gguf(tmp_path / n, split=(i, 3)).read_bytes() for i, n in enumerate(names)]
    with serve_hub() as hub:
        for n, d in zip(names, shards):
            hub.add_file("org/split", f"q/{n}", d, lfs=True)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        cfg = tmp_path / "pylmserv.toml"
        cfg.write_text(f'[models.big]\nhf = "org/split"\nfile = "q/{names[0]}"\n')
        lock = tmp_path / "pylmserv.lock"
        # A lock that pins only the first shard (as the first landing's prefetch wrote it) is refused...
        first = Hash.of_bytes(shards[0])
        lock.write_text(f'version = 1\n[models.big]\nhf = "org/split"\nfile = "q/{names[0]}"\nmode = "flat"\n'
                        f'url = "{hub.url}/org/split/resolve/main/q/{names[0]}"\nhash = "{first.sri}"\n')
        with pytest.raises(UsageError, match="pins only it") as exc:
            fetch(["big"], config=cfg, lock=lock, progress=False)
        assert "pylmserv prefetch --refresh big" in exc.value.hint
        # ...and the hint's command fixes it.
        prefetch(["big"], config=cfg, via="python", refresh=True)
        pin = load_lock(lock).models["big"]
        assert [s.file for s in pin.shards] == names[1:]
        assert [s.hash for s in pin.shards] == [Hash.of_bytes(d) for d in shards[1:]]
        assert [s.size for s in pin.shards] == [len(d) for d in shards[1:]]
        downloads_before = sum(1 for m, p, _ in hub.requests if "/resolve/" in p)
        [r] = fetch(["big"], config=cfg, lock=lock, progress=False)
        assert [p.read_bytes() for p in r.files] == shards
        assert sum(1 for m, p, _ in hub.requests if "/resolve/" in p) > downloads_before


def test_five_parallel_prefetch_processes_leave_all_five_pins(tmp_path, http_dir, home):
    """Real processes, one name each, into one lock: read-merge-write under one file lock."""
    www, base = http_dir
    lines = []
    for i in range(5):
        (www / f"m{i}.bin").write_bytes(f"model {i}".encode() * 1000)
        lines += [f"[models.m{i}]", f'url = "{base}/m{i}.bin"', ""]
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text("\n".join(lines))
    env = dict(os.environ, PYLMSERV_HOME=str(home))
    repo = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-m", "pylmserv", "--config", str(cfg), "prefetch", "--via", "python",
                               f"m{i}"], env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(5)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    lock = load_lock(tmp_path / "pylmserv.lock")
    assert sorted(lock.models) == [f"m{i}" for i in range(5)]
    for i in range(5):
        assert lock.models[f"m{i}"].hash == Hash.of_bytes(f"model {i}".encode() * 1000)


@pytest.mark.nix
def test_lock_written_by_prefetch_is_read_by_nix_with_the_typed_keys(tmp_path, gitenv, nix):
    repo = gitrepos.make_repo(tmp_path / "r", {"a.txt": "1\n"})
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(f'[sources.r]\ntype = "git"\nurl = "{gitrepos.uri(repo)}"\nref = "main"\nsubmodules = true\n')
    prefetch(config=cfg, via="python")
    out = subprocess.run(["nix", "eval", "--impure", "--json", "--expr",
                          f"builtins.fromTOML (builtins.readFile {tmp_path / 'pylmserv.lock'})"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["version"] == 2
    r = data["sources"]["r"]
    assert (r["type"], r["git_url"], r["fetcher"], r["submodules"]) == ("git", gitrepos.uri(repo), "builtins.fetchGit", True)


def test_unwritable_store_for_the_file_lock_is_a_clean_error(tmp_path, http_dir, monkeypatch):
    www, base = http_dir
    (www / "a.bin").write_bytes(b"abc")
    (tmp_path / "home").write_text("a file where the store should be")
    monkeypatch.setenv("PYLMSERV_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text(f'[models.a]\nurl = "{base}/a.bin"\n')
    with pytest.raises(UsageError) as exc:
        prefetch(config=cfg, via="python")
    assert "PYLMSERV_HOME" in exc.value.message + (exc.value.hint or "")
    assert not (tmp_path / "pylmserv.lock").exists()
