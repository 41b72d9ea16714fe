"""Every value pylmserv writes into a lock reads back identically through Nix 2.8's
builtins.fromTOML (toml11) - or is refused at input with a clear message. tomllib and
real Nix side by side, over hostile configs and hostile Hub answers; then `nix build` a
model from such a lock."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.core.errors import ConfigError
from pylmserv.core.hashing import Hash
from pylmserv.pins.config import load_config
from pylmserv.pins.lock import INT64_MAX, GitPin, HfPin, Lock, Shard, load_lock
from pylmserv.pins.prefetch import prefetch
from tests.support import flakeworld as fw
from tests.support.hubstub import serve_hub

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Legal, and nasty for a TOML writer or reader: quotes of every kind, backslashes, Nix
# interpolation, non-BMP characters, bidi marks, TOML-looking text, long strings.
NASTY = [
    'say "hi"', "it's", "'''", '"""', "back\\slash\\\\", "${builtins.abort \"x\"}", "$${x}",
    "\U0001F600 emoji", "\u00e9t\u00e9 \u6f22\u5b57", "\u200f\u202b rtl", "# not a comment",
    "[models.x]", "a = 1", "x" * 5000, "\u00a0nbsp", "\ufeffbom",
]


def nix_read(path: Path):
    out = subprocess.run(["nix", "eval", "--impure", "--json", "--expr",
                          f"builtins.fromTOML (builtins.readFile {path})"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.nix
def test_nasty_values_read_back_identically_by_tomllib_and_nix(tmp_path, nix):
    h = Hash.of_bytes(b"x")
    lock = Lock(tmp_path / "pylmserv.lock")
    for i, text in enumerate(NASTY):
        lock = lock.with_entry(HfPin(kind="models", name=f"m{i}", url=f"https://huggingface.co/o/r/resolve/{'c' * 40}/f.gguf",
                                     hash=h, rev="c" * 40, hf="o/r", file=text, revision=text,
                                     size=INT64_MAX if i == 0 else i,
                                     shards=(Shard(text, "https://example.org/a%20b.gguf", h, 0),)))
        lock = lock.with_entry(GitPin(kind="sources", name=f"s{i}", url="https://example.org/r.git", hash=h,
                                      rev="d" * 40, ref=text, git_url="https://example.org/r.git", version="1.0",
                                      cosmocc="3.3.6"))
    path = lock.write()
    ours, theirs = tomllib.loads(path.read_text()), nix_read(path)
    assert ours == theirs
    assert theirs["models"]["m0"]["size"] == INT64_MAX
    assert [theirs["models"][f"m{i}"]["file"] for i in range(len(NASTY))] == NASTY
    assert load_lock(path).models == lock.models  # and pylmserv reads its own back


BAD_CONFIG = {
    "nul": ('[models.m]\nurl = "https://x/a.gguf"\nsize = 1\nhf_x = 1\n', None),
    "nul-in-url": ('[models.m]\nurl = "https://x/a\\u0000.gguf"\n', "control character U+0000"),
    "esc-in-file": ('[models.m]\nhf = "o/r"\nfile = "a\\u001b[2J.gguf"\n', "control character U+001B"),
    "del-in-ref": ('[sources.s]\ntype = "github"\nowner = "o"\nrepo = "r"\nref = "v1\\u007f"\n', "control character U+007F"),
    "tab-in-ref": ('[sources.s]\ntype = "git"\nurl = "https://x/r.git"\nref = "1\\t2"\n', "control character U+0009"),
    "space-in-version": ('[sources.s]\ntype = "url"\nurl = "https://x/a.zip"\nversion = "1 2"\n', "must be letters, digits"),
    "size-over-int64": (f'[models.m]\nurl = "https://x/a.gguf"\nsize = {INT64_MAX + 1}\n', "64-bit integer"),
    "negative-size": ('[models.m]\nurl = "https://x/a.gguf"\nsize = -1\n', "must not be negative"),
    "float-size": ('[models.m]\nurl = "https://x/a.gguf"\nsize = 1.5\n', "a float cannot go into the lock"),
    "date-version": ('[sources.s]\ntype = "url"\nurl = "https://x/a.zip"\nversion = 1979-05-27\n', "TOML dates"),
    "time-revision": ('[models.m]\nhf = "o/r"\nfile = "a.gguf"\nrevision = 07:32:00\n', "TOML dates"),
    "space-in-url": ('[models.m]\nurl = "https://x/a b.gguf"\n', "not a URL Nix can fetch"),
    "quote-in-url": ('[models.m]\nurl = "https://x/a\\".gguf"\n', "not a URL Nix can fetch"),
    "non-ascii-url": ('[models.m]\nurl = "https://x/\u00e9.gguf"\n', "not a URL Nix can fetch"),
    "hf-dotdot": ('[models.m]\nhf = "o/r"\nfile = "../../secret.gguf"\n', "path inside the repository"),
    "hf-repo-query": ('[models.m]\nhf = "o/.."\nfile = "a.gguf"\n', "hf must be 'org/repo'"),
}
del BAD_CONFIG["nul"]


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_values_nix_cannot_carry_are_refused_at_input(tmp_path, case):
    text, needle = BAD_CONFIG[case]
    (tmp_path / "pylmserv.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "pylmserv.toml")
    assert needle in exc.value.message, exc.value.message
    assert "\x00" not in exc.value.message and "\x1b" not in exc.value.message


def test_nul_is_refused_even_where_toml_allows_it(tmp_path):
    """Nix strings are C strings: fromTOML cuts "a\\u0000b" to "a" (checked here), so a
    value with NUL would read back differently: refused."""
    (tmp_path / "v.toml").write_text('x = "a\\u0000b"\n')
    assert tomllib.loads((tmp_path / "v.toml").read_text())["x"] == "a\x00b"
    (tmp_path / "pylmserv.toml").write_text('[sources.s]\ntype = "git"\nurl = "https://x/r.git"\nref = "a\\u0000b"\n')
    with pytest.raises(ConfigError, match="U\\+0000"):
        load_config(tmp_path / "pylmserv.toml")


@pytest.mark.nix
def test_hostile_hub_names_pin_and_nix_builds_the_model_from_that_lock(tmp_path, nix, home, monkeypatch):
    """A Hub file and revision with every nasty (legal) character: the lock reads back
    identically through Nix, and `nix build .#model-NAME` fetches and verifies it."""
    data = b"GGUF" + bytes(range(256)) * 64
    odd_file = "dir/we ird-\u20ac\U0001F600'q\"$x{y}#%&=+.gguf"
    odd_rev = "r\u00e9l\u00e9ase-'1'"
    with serve_hub() as hub:
        hub.add_file("org-x/re_po.v2", odd_file, data, branch=odd_rev, lfs=True)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        project = tmp_path / "project"
        project.mkdir()
        cfg = project / "pylmserv.toml"
        cfg.write_text(f'[models.odd]\nhf = "org-x/re_po.v2"\nfile = {json.dumps(odd_file, ensure_ascii=False)}\n'
                       f'revision = {json.dumps(odd_rev, ensure_ascii=False)}\ndescription = "\\u001b[31m red"\n',
                       encoding="utf-8")
        flake = fw.copy_flake(tmp_path / "flake")
        lock_path = flake / "pylmserv.lock"
        prefetch(config=cfg, lock=lock_path, via="python")
        ours, theirs = tomllib.loads(lock_path.read_text()), nix_read(lock_path)
        assert ours == theirs
        pin = theirs["models"]["odd"]
        assert (pin["file"], pin["revision"], pin["type"]) == (odd_file, odd_rev, "hf")
        proc = fw.nix("nix", "build", "--no-link", "--json", f"path:{flake}#model-odd")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)[0]["outputs"]["out"]
        assert Path(out).read_bytes() == data
