"""Config and lock: validation errors, the lock format (read back by Nix's fromTOML), the catalog."""
from __future__ import annotations

import json
import subprocess

import pytest

from pylmserv.pins.config import LockEntry, Lock, load_config, load_lock, packaged_dir
from pylmserv.pins.lock import LOCK_VERSION
from pylmserv.core.errors import ConfigError
from pylmserv.core.hashing import Hash

REPO_ROOT = packaged_dir().parent.parent


def cfg(tmp_path, text):
    p = tmp_path / "pylmserv.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, needle", [
    ('[sources.x]\ntype = "github"\nowner = "o"\nrepo = \n', "line 4, column 8"),
    ('[sources.x]\ntype = "svn"\nurl = "https://x"\n', "unknown source type 'svn'"),
    ('[sources.x]\ntype = "github"\nowner = "o"\nref = "v1"\n', "missing field 'repo'"),
    ('[sources.x]\ntype = "url"\nurl = "https://x/a.zip"\nsha256 = "nothex"\n', "bad sha256"),
    ('[sources.x]\ntype = "url"\nurl = "ftp://x/a.zip"\n', "unsupported URL"),
    ('[sources.x]\ntype = "url"\nurl = "https://x/a.bin"\nunpack = true\n', "not a known archive"),
    ('[models.m]\nhf = "org/repo"\nurl = "https://x"\n', "either url or hf"),
    ('[models.m]\nhf = "no-slash"\nfile = "a.gguf"\n', "hf must be 'org/repo'"),
    ('[models.m]\nurl = "https://x/m.gguf"\nsize = "big"\n', "'size' must be a int"),
    ('[sources.x]\ntype = "git"\nurl = "https://x"\nref = "v1"\ncolour = "red"\n', "unknown key(s) colour"),
    ('sources = 3\n', "must be a table of tables"),
])
def test_config_errors_are_one_line_with_location(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(cfg(tmp_path, text))
    assert needle in exc.value.message
    assert "\n" not in exc.value.message and str(tmp_path) in exc.value.message


@pytest.mark.parametrize("text, needle", [
    ("version = 1\n[sources.x]\nurl = \"https://x\"\nmode = \"nar\"\nhash = \"sha256-bad\"\n", "bad hash"),
    ("version = 1\n[sources.x]\nurl = \"https://x\"\nmode = \"tree\"\nhash = \"%s\"\n", "mode must be"),
    ("version = 7\n", "unsupported lock version 7"),
    ("version = 1\n[models.m]\nmode = \"flat\"\nhash = \"%s\"\n", "missing field 'url'"),
    ("version = 1\n[models.m\n", "invalid TOML"),
    ("\xff\xfe garbage", "not UTF-8"),
])
def test_corrupt_lock_errors(tmp_path, text, needle):
    p = tmp_path / "pylmserv.lock"
    text = text.replace("%s", Hash.of_bytes(b"").sri) if "%s" in text else text
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load_lock(p)
    assert needle in exc.value.message and "prefetch" in (exc.value.hint or "")


@pytest.mark.nix
def test_lock_round_trip_sorted_stable_and_nix_readable(tmp_path, nix):
    entries = [
        LockEntry("sources", "zeta", "https://github.com/o/r/archive/abc.tar.gz", Hash.of_bytes(b"z"), "nar",
                  rev="abc", extra={"type": "github", "owner": "o", "repo": "r", "submodules": False}),
        LockEntry("models", "alpha", "https://x/m.gguf", Hash.of_bytes(b"a"), "flat", size=5_000_000_000),
    ]
    lock = Lock(tmp_path / "pylmserv.lock")
    for e in entries:
        lock = lock.with_entry(e)
    lock.write()
    text = (tmp_path / "pylmserv.lock").read_text()
    assert text == load_lock(tmp_path / "pylmserv.lock").to_toml()  # stable
    keys = [ln.split(" =")[0] for ln in text.splitlines() if " = " in ln]
    assert keys[0] == "version"
    out = subprocess.run(["nix", "eval", "--impure", "--json", "--expr",
                          f"builtins.fromTOML (builtins.readFile {tmp_path / 'pylmserv.lock'})"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["version"] == LOCK_VERSION
    assert data["sources"]["zeta"]["hash"] == Hash.of_bytes(b"z").sri
    assert data["models"]["alpha"]["size"] == 5_000_000_000


PUBLISHED = {  # from the issue: published pins the default catalog must carry exactly
    ("sources", "llama-cpp"): "sha256-5KWYTReyB05MWksZbv+RWnH4qdUPptSWAaPKysBIvsw=",
    ("sources", "llamafile"): "sha256-j7iPq1H3eB++aEMp2lbhMSO90t3DLFqgDQ4dseS9v7E=",
    ("sources", "cosmocc-3_3_6"): "26e3449357f31b82489774ef5c2d502a711bb711d4faf99a5fd6c96328a1c205",
    ("sources", "cosmocc-3_9_7"): "3f559555d08ece35bab1a66293a2101f359ac9841d563419756efa9c79f7a150",
    ("sources", "cosmocc-4_0_2"): "85b8c37a406d862e656ad4ec14be9f6ce474c1b436b9615e91a55208aced3f44",
    ("models", "stories15m"): "6151b1929d7f5aa3385d9ddef3393e55587c0a55de661562322bc51dfda93a04",
    ("models", "mistral-7b-instruct-v0_2"): "3e0039fd0273fcbebb49228943b17831aadd55cbcbf56f0af00499be2040ccf9",
}
# phi-3-mini-4k-instruct's published sha256 (8a83c7fb...2edef) has no published commit: it
# is not in the packaged lock, where nothing may move (issue 18).


def test_default_catalog_carries_the_published_pins_in_both_copies():
    root = load_lock(REPO_ROOT / "pylmserv.lock", missing_ok=False)
    packaged = load_lock(packaged_dir() / "pylmserv.lock", missing_ok=False)
    assert root.to_toml() == packaged.to_toml()
    for (kind, name), value in PUBLISHED.items():
        assert root.entry(kind, name).hash == Hash.parse(value, algo="sha256"), name
    config = load_config(packaged_dir() / "pylmserv.toml")
    assert set(config.sources) == set(root.sources)
    assert "gemma-2b" in config.models and "gemma-2b" not in root.models  # unpinned stays unpinned


def test_nothing_in_the_packaged_lock_can_move():
    """Every Hugging Face pin of the packaged catalog names a commit, never a branch such
    as `main` (a URL at a branch serves other bytes once the branch moves)."""
    import re

    packaged = load_lock(packaged_dir() / "pylmserv.lock", missing_ok=False)
    hf = [e for e in packaged.models.values() if e.get("type") == "hf" or "/resolve/" in e.url]
    assert hf
    for entry in hf:
        assert re.fullmatch(r"[0-9a-f]{40}", entry.rev or ""), (entry.name, entry.rev)
        assert f"/resolve/{entry.rev}/" in entry.url, (entry.name, entry.url)
