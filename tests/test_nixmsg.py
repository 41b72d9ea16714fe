"""nixmsg: every known Nix / Lix hash-mismatch format, from a corpus of real outputs."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pylmserv.core.errors import HashError
from pylmserv.core.hashing import Hash
from pylmserv.pins.nixmsg import got_hash, parse, strip_ansi
from pylmserv.pins.resolvers.base import Fetch
from pylmserv.pins.resolvers.fod import hash_fetch
from tests.support import gitrepos

CORPUS = Path(__file__).parent / "data" / "nixmsg"
EXPECTED = {k: v for k, v in json.loads((CORPUS / "expected.json").read_text()).items() if not k.startswith("_")}


def test_every_corpus_file_has_an_expectation():
    files = sorted(p.name for p in CORPUS.glob("*.txt"))
    assert files == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus(name):
    found = parse((CORPUS / name).read_text(encoding="utf-8"))
    want = EXPECTED[name]
    assert [m.got for m in found] == [Hash.parse(w["got"]) for w in want]
    assert [m.wanted for m in found] == [Hash.parse(w["wanted"]) if w["wanted"] else None for w in want]
    for m, w in zip(found, want):
        assert m.url == w.get("url")
        assert m.got_path == w.get("got_path")


def test_all_formats_concatenated_in_order():
    names = sorted(EXPECTED)
    text = "\n".join((CORPUS / n).read_text(encoding="utf-8") for n in names)
    got = [m.got for m in parse(text)]
    assert got == [Hash.parse(w["got"]) for n in names for w in EXPECTED[n]]


def test_ansi_is_ignored():
    raw = (CORPUS / "nix-2.8-fod-ansi-tty.txt").read_text()
    assert "\x1b[" in raw and "\x1b[" not in strip_ansi(raw)


def test_got_hash_single_none_and_conflicting():
    assert got_hash((CORPUS / "nix-2.3-wanted-got.txt").read_text()).nix32 == "0y6sjbzg5qqqip9sc9ajyd5ra3n2wwvarj6nhpzjhh05kqz3qja4"
    with pytest.raises(HashError, match="no hash mismatch"):
        got_hash("error: builder for '/nix/store/x.drv' failed with exit code 1")
    with pytest.raises(HashError, match="2 different"):
        got_hash((CORPUS / "nix-2.8-two-fods-keep-going.txt").read_text())


def test_crlf_and_no_false_positive_on_got_path_only():
    text = (CORPUS / "lix-2.92-got-path.txt").read_text().replace("\n", "\r\n")
    assert len(parse(text)) == 1
    assert parse("     got path: /nix/store/abc\n expected path: /nix/store/def\n") == []


@pytest.mark.nix
def test_live_nix_fod_output_parses(nix, tmp_path):
    """Not only the recorded corpus: this Nix's live output right now."""
    f = tmp_path / "payload.bin"
    f.write_bytes(b"live\n")
    expr = f'import <nix/fetchurl.nix> {{ url = "{f.as_uri()}"; sha256 = ""; }}'
    proc = subprocess.run(["nix-build", "--no-out-link", "--expr", expr], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert got_hash(proc.stderr) == Hash.of_bytes(b"live\n")


def test_unparseable_specified_value_still_yields_got():
    # Seen when a FOD is written with a placeholder instead of a hash: the wanted side is
    # not a hash, but the got side must still be read (was an IndexError).
    text = (
        "error: hash mismatch in fixed-output derivation '/nix/store/abc-source.drv':\n"
        "         specified: (empty)\n"
        "            got:    sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
    )
    found = parse(text)
    assert len(found) == 1
    assert found[0].got == Hash.of_bytes(b"")
    assert found[0].wanted is None


# --- eval-time fetchers: `NAR hash mismatch in input` (fetchTree / fetchGit / flake inputs) ---

FETCHTREE = (CORPUS / "nix-2.8-fetchtree-tarball.txt").read_text()
FETCHGIT = (CORPUS / "nix-2.8-fetchgit.txt").read_text()
TREE_GOT = Hash.parse("sha256-t1KrkiP0SuCSd5lffdJLOoHk6QB6TLkZkB4PkqGJYnY=")
GIT_GOT = Hash.parse("sha256-LXV/Bt1ZDZpoJR18KsaA8OgdcDnm8RNdby+8DHwf7Ts=")
ZEROS = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def test_input_mismatch_under_tty_colours():
    # How Nix colours it on a terminal: bold red `error:`, magenta quoted values.
    coloured = (FETCHTREE.replace("error:", "\x1b[31;1merror:\x1b[0m", 1)
                .replace("'sha256-", "'\x1b[35;1msha256-").replace("=',", "=\x1b[0m',"))
    assert "\x1b[35;1m" in coloured
    assert [m.got for m in parse(coloured)] == [TREE_GOT]


def test_truncated_input_mismatch_never_yields_a_hash():
    """Output cut anywhere before the closing quote of `got` (a killed nix, a clipped log) must
    not give a hash: a prefix of the base64 could still decode to a wrong hash."""
    full = FETCHGIT.rstrip("\n")
    assert parse(full)[0].got == GIT_GOT
    for cut in range(len(full) - 1):
        assert parse(full[:cut]) == [], full[:cut]


def test_two_input_mismatches_pick_by_url():
    log = FETCHGIT + "warning: something else\n" + FETCHTREE
    assert [m.got for m in parse(log)] == [GIT_GOT, TREE_GOT]
    with pytest.raises(HashError, match="2 different"):
        got_hash(log)
    assert got_hash(log, url="file:///tmp/nm/one.tar.gz") == TREE_GOT
    assert got_hash(log, url="git+file:///tmp/nm/repo") == GIT_GOT
    with pytest.raises(HashError, match="no hash mismatch"):
        got_hash(log, url="file:///tmp/nm/other.tar.gz")


def test_swapped_labels_resolved_by_the_inputs_own_narhash():
    """Constructed, not recorded: some Nix source revisions pass (actual, specified) to the
    `expected '%s' but got '%s'` format. The narHash in the input string is the specified one."""
    swapped = ("error: NAR hash mismatch in input 'https://h/x.tar.gz?narHash=sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA%3D', "
               f"expected '{TREE_GOT.sri}' but got '{ZEROS}'\n")
    (m,) = parse(swapped)
    assert m.got == TREE_GOT and m.wanted == Hash.parse(ZEROS)
    assert m.url == "https://h/x.tar.gz"


def test_quote_and_fake_trailer_inside_the_input_url():
    """A URL may carry quotes and text that mimics the trailer; Nix's real one comes last."""
    fake = Hash.of_bytes(b"attacker")
    text = (f"error: NAR hash mismatch in input 'file:///x', expected '{ZEROS}', got '{fake.sri}' .tar.gz' "
            f"(/nix/store/9qk25fygkjk0kssllrgcwkszaxdp406g-source), expected '{ZEROS}', got '{TREE_GOT.sri}'\n")
    assert [m.got for m in parse(text)] == [TREE_GOT]


@pytest.mark.parametrize("text", [
    # the trailer without the header
    f"note: expected '{ZEROS}', got 'sha256-t1KrkiP0SuCSd5lffdJLOoHk6QB6TLkZkB4PkqGJYnY='\n",
    # another Nix error that starts alike
    "/nix/store/x-system-path: Nar hash mismatch between nix-store --dump and nix db. You can repair db metadata\n",
    "error: NAR hash mismatch in input 'file:///a.tar.gz' (/nix/store/x-source)\n",
    # got is not a hash / has the wrong length / is empty
    f"error: NAR hash mismatch in input 'file:///a', expected '{ZEROS}', got 'sha256-t1KrkiP0SuCSd5lffdJLOoHk6QB6TLkZ='\n",
    f"error: NAR hash mismatch in input 'file:///a', expected '{ZEROS}', got 'definitely not a hash'\n",
    f"error: NAR hash mismatch in input 'file:///a', expected '{ZEROS}', got ''\n",
    # unterminated got quote, line ends
    f"error: NAR hash mismatch in input 'file:///a', expected '{ZEROS}', got 'sha256-t1KrkiP0SuCSd5lffdJLOoHk6QB6TLkZkB4PkqGJYnY=\n",
])
def test_look_alikes_do_not_parse(text):
    assert parse(text) == []


@pytest.mark.nix
def test_live_fetchtree_and_fetchgit_mismatches_match_nix(nix, tmp_path, gitenv):
    """This Nix's own fetchTree / fetchGit mismatch output parses to the narHash Nix itself
    computes for the same tree (and, for the tarball, to what `nix-prefetch-url --unpack` says,
    the hash the fod backend pins through builtins.fetchTarball)."""
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "run").write_text("#!/bin/sh\n")
    (src / "bin" / "run").chmod(0o755)
    (src / "README").write_text("live\n")
    tarball = tmp_path / "t.tar.gz"
    subprocess.run(["tar", "czf", str(tarball), "-C", str(tmp_path), "src"], check=True, timeout=60)
    repo = gitrepos.make_repo(tmp_path / "repo", {"README.md": "live\n", "bin/run": ("exec", "#!/bin/sh\n")})
    rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()

    def nix_eval(expr):
        return subprocess.run(["nix", "eval", "--impure", "--raw", "--expr", expr],
                              capture_output=True, text=True, timeout=300)

    tree = f'type = "tarball"; url = "{tarball.as_uri()}";'
    git = f'url = "{repo.as_uri()}"; rev = "{rev}";'
    for wrong, right in [(f"builtins.fetchTree {{ {tree} narHash = \"{ZEROS}\"; }}",
                          f"(builtins.fetchTree {{ {tree} }}).narHash"),
                         (f"builtins.fetchGit {{ {git} narHash = \"{ZEROS}\"; }}",
                          f"(builtins.fetchGit {{ {git} }}).narHash")]:
        bad = nix_eval(wrong)
        assert bad.returncode != 0 and "NAR hash mismatch in input" in bad.stderr, bad.stderr
        good = nix_eval(right)
        assert good.returncode == 0, good.stderr
        assert got_hash(bad.stderr) == Hash.parse(good.stdout.strip())
        assert parse(bad.stderr)[0].wanted == Hash.parse(ZEROS)
    # The fod backend (builtins.fetchTarball) pins the same tree hash that fetchTree reports.
    fod = hash_fetch(Fetch(kind="archive", url=tarball.as_uri(), name="t"), tmp_path)
    unpack = subprocess.run(["nix-prefetch-url", "--unpack", tarball.as_uri()], capture_output=True, text=True,
                            check=True, timeout=120).stdout.split()[-1]
    bad = nix_eval(f"builtins.fetchTree {{ {tree} narHash = \"{ZEROS}\"; }}")
    assert got_hash(bad.stderr, url=tarball.as_uri()) == Hash.parse(unpack, algo="sha256") == fod.hash
