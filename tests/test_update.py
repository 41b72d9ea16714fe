"""`pylmserv update` against loopback stand-ins of the GitHub API (backed by real git repos,
paginated, with injected rate-limit answers), github.com (git over dumb HTTP + archives)
and the Hugging Face Hub API."""
from __future__ import annotations

import json
import os
import time

import pytest

from pylmserv.core.errors import NetworkError, UsageError
from pylmserv.pins import upstream
from pylmserv.pins.config import load_config, load_lock
from pylmserv.pins.prefetch import prefetch
from pylmserv.pins.update import EXIT_UPDATED, RetaggedError, update
from tests.conftest import run_cli
from tests.support import gitrepos
from tests.support.githubapi import serve_github
from tests.support.hubstub import serve_hub

CONFIG = """\
# project pins (this comment must survive an update)
[sources.llama-cpp]
type = "github"   # from GitHub
owner = "ggml-org"
repo = "llama.cpp"
ref = "b9"
track = "tags"
tag-pattern = 'b(\\d+)'

[sources.plain]
type = "github"
owner = "ggml-org"
repo = "llama.cpp"
ref = "b9"
"""


@pytest.fixture
def upstream_world(tmp_path, http_dir, monkeypatch, gitenv):
    """ggml-org/llama.cpp stand-in: a real repo with tags b9, b10, b100 and a few non-matching
    tags, published as github.com (git + archives) and behind a GitHub API stand-in."""
    www, base = http_dir
    src = gitrepos.make_repo(tmp_path / "upstream", {"VERSION": "9\n"})
    gitrepos.tag(src, "b9")
    for n in ("10", "100"):
        gitrepos.commit(src, {"VERSION": f"{n}\n"}, f"release {n}")
        gitrepos.tag(src, f"b{n}")
    gitrepos.tag(src, "gguf-v0.99", annotated=False)
    gitrepos.tag(src, "b99-rc", annotated=False)
    gitrepos.publish_github(www, "ggml-org", "llama.cpp", src)
    monkeypatch.setenv("PYLMSERV_GITHUB_URL", base)
    monkeypatch.setenv("PYLMSERV_RATE_LIMIT_WAIT", "5")
    with serve_github() as gh:
        gh.add_repo("ggml-org", "llama.cpp", src)
        monkeypatch.setenv("PYLMSERV_GITHUB_API", gh.url)
        yield src, www, gh


def project(tmp_path, text=CONFIG, names=None):
    directory = tmp_path / "proj"
    directory.mkdir(exist_ok=True)
    cfg = directory / "pylmserv.toml"
    cfg.write_text(text)
    prefetch(names=names, config=cfg, via="python")
    return cfg, directory / "pylmserv.lock"


def test_tags_follow_pattern_in_numeric_order_dry_run_then_apply(tmp_path, upstream_world):
    src, www, gh = upstream_world
    cfg, lock = project(tmp_path)
    before = (cfg.read_bytes(), lock.read_bytes())
    dry = run_cli("--config", cfg, "update", "--dry-run")
    assert dry.returncode == EXIT_UPDATED, dry.stderr
    assert "sources.llama-cpp: b9 -> b100" in dry.stdout  # b100 > b10 > b99-rc (not matching) > b9
    assert "sources.plain: left alone (no `track` key)" in dry.stdout
    assert (cfg.read_bytes(), lock.read_bytes()) == before
    assert any("page=2" in path for path, _ in gh.requests)  # the tag list came in pages

    result = update(config=cfg, via="python")
    assert [e.status for e in result.entries] == ["updated", "not-followed"]
    text = cfg.read_text()
    assert text.startswith("# project pins (this comment must survive an update)")
    assert 'ref = "b100"' in text and 'type = "github"   # from GitHub' in text and "tag-pattern = 'b(\\d+)'" in text
    assert load_config(cfg).sources["plain"].ref == "b9"
    pinned = load_lock(lock).sources["llama-cpp"]
    assert pinned.rev == gitrepos.git(src, "rev-parse", "b100^{commit}") and pinned.get("ref") == "b100"
    assert pinned.url.endswith(f"/archive/{pinned.rev}.tar.gz")

    again = run_cli("--config", cfg, "update", "--json")
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert data["changed"] == 0 and data["entries"][0]["status"] == "current"


def test_commit_makes_one_git_commit_per_entry(tmp_path, upstream_world):
    src, www, gh = upstream_world
    text = CONFIG.replace("[sources.plain]", "# second copy\n[sources.second]\ntrack = \"tags\"\ntag-pattern = 'b(\\d+)'")
    cfg, lock = project(tmp_path, text=text)
    directory = cfg.parent
    gitrepos.git(directory, "init", "-q", "-b", "main")
    (directory / "other.txt").write_text("staged but not ours\n")
    gitrepos.git(directory, "add", "-A")
    gitrepos.git(directory, "commit", "-q", "-m", "start")
    (directory / "other.txt").write_text("changed, staged\n")
    gitrepos.git(directory, "add", "other.txt")
    proc = run_cli("--config", cfg, "update", "--commit", "--via", "python")
    assert proc.returncode == EXIT_UPDATED, proc.stderr
    log = gitrepos.git(directory, "log", "--format=%s").splitlines()
    assert log[:2] == ["second: b9 -> b100", "llama-cpp: b9 -> b100"]
    assert "other.txt" not in gitrepos.git(directory, "show", "--name-only", "--format=", "HEAD")
    assert gitrepos.git(directory, "diff", "--cached", "--name-only") == "other.txt"  # left staged, not committed


def test_commit_outside_git_repo_refused_before_anything(tmp_path, upstream_world):
    cfg, lock = project(tmp_path)
    before = (cfg.read_bytes(), lock.read_bytes())
    with pytest.raises(UsageError, match="not in a git repository"):
        update(config=cfg, commit=True, via="python")
    assert (cfg.read_bytes(), lock.read_bytes()) == before


def test_retagged_release_is_refused(tmp_path, upstream_world):
    src, www, gh = upstream_world
    cfg, lock = project(tmp_path, text=CONFIG.replace('ref = "b9"', 'ref = "b100"', 1))
    locked = load_lock(lock).sources["llama-cpp"].rev
    gitrepos.commit(src, {"VERSION": "100 again\n"}, "sneaky")
    gitrepos.git(src, "tag", "-f", "-a", "b100", "-m", "moved")
    gitrepos.publish_github(www, "ggml-org", "llama.cpp", src)
    before = (cfg.read_bytes(), lock.read_bytes())
    with pytest.raises(RetaggedError, match="retagged") as info:
        update(config=cfg, via="python")
    assert locked[:12] in info.value.message and info.value.exit_code == 4
    assert (cfg.read_bytes(), lock.read_bytes()) == before


def test_releases_skip_drafts_and_prereleases_and_rate_limit_is_waited(tmp_path, upstream_world):
    src, www, gh = upstream_world
    gh.release("ggml-org", "llama.cpp", "b9", date="2026-01-01T00:00:00Z")
    gh.release("ggml-org", "llama.cpp", "b10", date="2026-02-01T00:00:00Z")
    gh.release("ggml-org", "llama.cpp", "b100", date="2026-03-01T00:00:00Z", prerelease=True)
    gh.release("ggml-org", "llama.cpp", "b1000", date="2026-04-01T00:00:00Z", draft=True)
    cfg, lock = project(tmp_path, text=CONFIG.replace('track = "tags"', 'track = "releases"'), names=["llama-cpp"])
    gh.fault("/releases", 403, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 1)})
    gh.fault("/releases", 429, {"Retry-After": "1"})
    result = update(names=["llama-cpp"], config=cfg, dry_run=True)
    entry = result.entries[0]
    assert entry.status == "would-update" and entry.new.ref == "b10" and entry.new.date.startswith("2026-02-01")
    assert sum("/releases" in p for p, _ in gh.requests) >= 3  # two refused answers, then the list


def test_long_rate_limit_fails_clearly_and_writes_nothing(tmp_path, upstream_world):
    src, www, gh = upstream_world
    cfg, lock = project(tmp_path, names=["llama-cpp"])
    before = (cfg.read_bytes(), lock.read_bytes())
    gh.fault("/tags", 403, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 3600)})
    proc = run_cli("--config", cfg, "update", env={"GITHUB_TOKEN": "ghp_secret_token"})
    assert proc.returncode == 3
    assert "rate limit is exhausted until" in proc.stderr and "GITHUB_TOKEN" in proc.stderr
    assert "ghp_secret_token" not in proc.stderr + proc.stdout
    assert (cfg.read_bytes(), lock.read_bytes()) == before


def test_token_goes_to_the_api_only_and_foreign_next_page_refused(tmp_path, upstream_world, monkeypatch):
    src, www, gh = upstream_world
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_tok")
    assert {t.name for t in upstream.tags("ggml-org", "llama.cpp", "t")} >= {"b9", "b10", "b100"}
    assert all(auth == "Bearer ghp_tok" for _, auth in gh.requests)
    gh.next_host = "http://127.0.0.2:9"
    with pytest.raises(NetworkError, match="another host"):
        upstream.tags("ggml-org", "llama.cpp", "t")


def test_branch_tracking_moves_lock_not_config_and_git_tags(tmp_path, upstream_world, monkeypatch):
    src, www, gh = upstream_world
    repo_uri = gitrepos.uri(src)
    text = ('[sources.tip]\ntype = "github"\nowner = "ggml-org"\nrepo = "llama.cpp"\nref = "main"\ntrack = "branch"\n\n'
            f'[sources.gitsrc]\ntype = "git"\nurl = "{repo_uri}"\nref = "b10"\ntrack = "tags"\ntag-pattern = \'b(\\d+)\'\n')
    cfg, lock = project(tmp_path, text=text)
    assert update(config=cfg, via="python").changed[0].name == "gitsrc"  # main has not moved
    new = gitrepos.commit(src, {"NEW": "x\n"}, "tip moves")
    gitrepos.publish_github(www, "ggml-org", "llama.cpp", src)
    config_before = cfg.read_bytes()
    result = update(names=["tip"], config=cfg, via="python")
    assert result.entries[0].status == "updated" and result.entries[0].new.commit == new
    assert cfg.read_bytes() == config_before and load_lock(lock).sources["tip"].rev == new
    assert load_config(cfg).sources["gitsrc"].ref == "b100"


def test_hf_models_follow_branch_head(tmp_path, monkeypatch):
    with serve_hub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        first = hub.add_file("org/m", "m.gguf", os.urandom(2048))
        text = ('[models.onmain]\nhf = "org/m"\nfile = "m.gguf"\n\n'
                f'[models.pinned]\nhf = "org/m"\nfile = "m.gguf"\nrevision = "{first}"\ntrack = "branch"\n\n'
                f'[models.fixed]\nhf = "org/m"\nfile = "m.gguf"\nrevision = "{first}"\n')
        cfg, lock = project(tmp_path, text=text)
        assert update(config=cfg).changed == []
        second = hub.add_file("org/m", "m.gguf", os.urandom(4096))
        result = update(config=cfg, via="python")
        by = {e.name: e for e in result.entries}
        assert by["onmain"].status == "updated" and by["onmain"].new.size == 4096 and by["onmain"].old.size == 2048
        assert by["pinned"].status == "updated" and by["fixed"].status == "not-followed"
        assert "revision is a commit" in by["fixed"].describe()
        assert load_config(cfg).models["pinned"].revision == second
        assert load_config(cfg).models["onmain"].revision == "main"
        locked = load_lock(lock).models
        assert locked["onmain"].rev == second and locked["pinned"].rev == second and locked["fixed"].rev == first


def test_url_source_follows_github_releases_dry_run(tmp_path, upstream_world):
    src, www, gh = upstream_world
    gh.add_repo("jart", "cosmopolitan", src)
    for v in ("3.3.6", "3.9.7", "4.0.2"):
        gh.release("jart", "cosmopolitan", v)
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text('[sources.cosmocc]\ntype = "url"\n'
                   'url = "https://github.com/jart/cosmopolitan/releases/download/3.3.6/cosmocc-3.3.6.zip"\n'
                   'version = "3.3.6"\ntrack = "releases"\n')
    entry = update(config=cfg, dry_run=True).entries[0]
    assert (entry.old.ref, entry.new.ref) == ("3.3.6", "4.0.2")
    assert entry.config_values == {
        "url": "https://github.com/jart/cosmopolitan/releases/download/4.0.2/cosmocc-4.0.2.zip", "version": "4.0.2"}


def test_newest_ordering():
    T = upstream.Tag
    tags = [T("b999"), T("b1000"), T("b10000-rc", prerelease=True), T("v2"), T("gguf-v1")]
    assert upstream.newest(tags, r"b(\d+)").name == "b1000"
    assert upstream.newest([T("1.9.0"), T("1.10.0"), T("1.10.0-rc1", prerelease=True)], None).name == "1.10.0"
    assert upstream.newest(tags, r"nomatch") is None


def test_unknown_track_value_is_a_config_error(tmp_path):
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text('[sources.x]\ntype = "github"\nowner = "o"\nrepo = "r"\nref = "v1"\ntrack = "newest"\n')
    proc = run_cli("--config", cfg, "update")
    assert proc.returncode == 2 and "unknown track 'newest'" in proc.stderr
    cfg.write_text('[sources.x]\ntype = "github"\nowner = "o"\nrepo = "r"\nref = "v1"\ntrack = "tags"\n'
                   'tag-pattern = "b(("\n')
    proc = run_cli("--config", cfg, "update")
    assert proc.returncode == 2 and "not a regular expression" in proc.stderr


def test_hostile_tag_names_and_answers_are_not_followed(tmp_path, upstream_world):
    src, www, gh = upstream_world
    gh.add_repo("jart", "cosmopolitan", src)
    for v in ("3.3.6", "9.9.9/../../evil", "-9.9.9", "9.9.9\n[x]", "../9.9.9", "4.0.2"):
        gh.release("jart", "cosmopolitan", v)
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text('[sources.cosmocc]\ntype = "url"\n'
                   'url = "https://github.com/jart/cosmopolitan/releases/download/3.3.6/cosmocc-3.3.6.zip"\n'
                   'version = "3.3.6"\ntrack = "releases"\n')
    assert update(config=cfg, dry_run=True).entries[0].new.ref == "4.0.2"
    gh.fault("/releases", 429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # a date: not slept on
    with pytest.raises(NetworkError, match="rate limit"):
        update(config=cfg, dry_run=True)
    gh.fault("/releases", 403, {})  # a plain refusal, not a rate limit
    with pytest.raises(NetworkError, match="refused access"):
        update(config=cfg, dry_run=True)
