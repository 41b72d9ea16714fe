"""A copy of pylmserv's flake next to a lock whose pins point at 127.0.0.1 (tests only).

The served things are real: a GGUF-looking model file, a GitHub-style release tarball
(single top-level directory, an executable and a symlink inside), a zip with a single
top-level directory, a flat toolchain zip and a local git repository. Their pins are
written by `pylmserv prefetch` (and re-checked with pylmserv's fetch + unpack + NAR), so
a Nix build that succeeds means Nix accepted pylmserv's hashes. Contents are random per world, so a store path
left by an earlier run can never make a build pass without a fetch.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from pylmserv.pins.config import Lock, LockEntry, load_lock
from pylmserv.core.hashing import Hash
from tests.support import gitrepos
from tests.support.gitrepos import GIT_ENV

REPO = Path(__file__).resolve().parents[2]
STANDIN_SRC = REPO / "tests" / "nixpkgs-standin"
# nixpkgs' real lib (nix-community/nixpkgs.lib), unpacked into the stand-in before use.
NIXPKGS_LIB_FIXTURE = REPO.parent / "shared" / "fixtures" / "nixpkgs-lib-de42d44.tar.gz"
FLAKE_FILES = ("flake.nix", "flake.lock", "nix", "pyproject.toml", "pylmserv")
_standin_dir: List[Path] = []


def standin() -> Path:
    """The nixpkgs stand-in with nixpkgs' real lib in ./lib (prepared once per process).
    Skips the calling test when the lib fixture is absent (fails it under CI)."""
    import tempfile

    if _standin_dir:
        return _standin_dir[0]
    if not NIXPKGS_LIB_FIXTURE.is_file():
        from tests.support.tools import missing

        missing(f"nixpkgs lib fixture ({NIXPKGS_LIB_FIXTURE}): the stand-in uses the real lib",
                "../shared/fixtures beside the checkout")
    dest = Path(tempfile.mkdtemp(prefix="pylmserv-standin-")) / "nixpkgs-standin"
    shutil.copytree(STANDIN_SRC, dest, ignore=shutil.ignore_patterns("lib", ".gitignore"))
    with tarfile.open(NIXPKGS_LIB_FIXTURE) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("nixpkgs-lib/lib/") or m.name == "nixpkgs-lib/lib"]
        for m in members:
            m.name = m.name[len("nixpkgs-lib/"):]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            tar.extractall(dest, members=members)
    _standin_dir.append(dest)
    return dest


def override_nixpkgs() -> List[str]:
    """Arguments that replace the flake's nixpkgs input by the stand-in."""
    return ["--no-write-lock-file", "--override-input", "nixpkgs", f"path:{standin()}"]
COSMOCC_VERSION = "3.3.6"


@dataclass
class World:
    flake: Path
    lock: Lock
    model_bytes: bytes
    expected: Dict[str, Hash] = field(default_factory=dict)  # output name -> pylmserv's hash
    salt: str = ""  # random per world; the fixture cosmocc writes it into what it builds

    def entry(self, output: str) -> LockEntry:
        kind, _, name = output.partition("-")
        return self.lock.entry("models" if kind == "model" else "sources", name)

    @property
    def outputs(self) -> List[str]:
        return sorted(self.expected)


def nix(*args: str, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a Nix command offline (env from the `nix` fixture; loopback never proxied)."""
    env = dict(os.environ)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(key, None)
    env["no_proxy"] = "127.0.0.1,localhost"
    env.update(GIT_ENV)  # file:// submodules for builtins.fetchGit
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def fixed_path(hash_: Hash, name: str, recursive: bool) -> str:
    """Nix's own answer: the store path of a fixed-output derivation with this hash/name."""
    args = ["nix-store", "--print-fixed-path"] + (["--recursive"] if recursive else []) + ["sha256", hash_.sri, name]
    proc = nix(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def copy_flake(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in FLAKE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _tree(root: Path, top: str, salt: bytes) -> Path:
    base = root / top
    (base / "src").mkdir(parents=True)
    (base / "bin").mkdir()
    (base / "README.md").write_bytes(b"fixture " + salt.hex().encode() + b"\n")
    (base / "src" / "main.c").write_bytes(b"int main(void) { return 0; }\n/* " + salt.hex().encode() + b" */\n")
    run = base / "bin" / "run.sh"
    run.write_bytes(b"#!/bin/sh\necho run\n")
    run.chmod(0o755)
    (base / "LINK").symlink_to("README.md")
    return base


def _tarball(tree: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)


def _zip_with_root(tree: Path, out: Path) -> None:
    """A zip with one top-level directory, unix modes kept (like GitHub's zipballs)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(tree.rglob("*")):
            if path.is_symlink() or path.is_dir():
                continue
            info = zipfile.ZipInfo(f"{tree.name}/{path.relative_to(tree)}")
            info.external_attr = (0o100000 | (path.stat().st_mode & 0o777)) << 16
            zf.writestr(info, path.read_bytes())


# The fixture cosmocc: like an APE program it needs a writable $HOME (the loader unpacks
# itself there); it "compiles" by writing an APE-looking file that names the fixture.
COSMOCC_SCRIPT = """#!/bin/sh
set -e
[ -w "$HOME" ] || { echo "fixture cosmocc: HOME=$HOME is not writable (APE loader)" >&2; exit 1; }
mkdir -p "$HOME/.ape-fixture"
out=""
while [ $# -gt 0 ]; do case "$1" in -o) out="$2"; shift 2;; *) shift;; esac; done
printf "MZqFpD='\\n# built by fixture cosmocc %s\\n" SALT > "$out"
chmod +x "$out"
"""


def _flat_zip(out: Path, salt: bytes) -> None:
    """A toolchain-like zip without a top-level directory (cosmocc's layout). Its tool is
    stored without exec bits, as release zips may be: cosmocc.nix must fix them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("bin/cosmocc")
        info.external_attr = 0o100644 << 16
        zf.writestr(info, COSMOCC_SCRIPT.replace("SALT", salt.hex()).encode())
        zf.writestr(zipfile.ZipInfo("README.md"), b"fixture cosmocc\n")
    out.write_bytes(buf.getvalue())


# A llamafile-shaped source: its Makefile wants cosmocc at .cosmocc/<version> and has a
# rule that "downloads" it when missing (here: a different, marked toolchain).
LLAMAFILE_MAKEFILE = """PREFIX = /usr/local
COSMOCC = .cosmocc/{version}
CC = $(COSMOCC)/bin/cosmocc

all: o/llamafile

.cosmocc/{version}:
\tbuild/download-cosmocc.sh $@ {version} 0000

o/llamafile: .cosmocc/{version} main.c
\tmkdir -p o
\t$(CC) -o $@ main.c

install: o/llamafile
\tmkdir -p $(PREFIX)/bin
\tinstall -m755 o/llamafile $(PREFIX)/bin/llamafile
"""

DOWNLOAD_SCRIPT = """#!/bin/sh
mkdir -p "$1/bin"
printf '#!/bin/sh\\nwhile [ $# -gt 0 ]; do case "$1" in -o) printf DOWNLOADED > "$2"; shift 2;; *) shift;; esac; done\\n' > "$1/bin/cosmocc"
chmod +x "$1/bin/cosmocc"
"""


def _llamafile_tree(root: Path, top: str, salt: bytes) -> Path:
    base = root / top
    (base / "build").mkdir(parents=True)
    (base / "Makefile").write_text(LLAMAFILE_MAKEFILE.format(version=COSMOCC_VERSION))
    (base / "main.c").write_text(f"int main(void) {{ return 0; }} /* {salt.hex()} */\n")
    script = base / "build" / "download-cosmocc.sh"
    script.write_text(DOWNLOAD_SCRIPT)
    script.chmod(0o755)
    return base


def _git_repo(path: Path, salt: bytes, branch: str) -> str:
    path.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(path)]
    subprocess.run(git + ["init", "-q"], check=True, timeout=60)
    (path / "gadget.txt").write_bytes(b"gadget " + salt.hex().encode() + b"\n")
    # `git archive` (Nix 2.8's builtins.fetchGit without submodules) drops this file,
    # a checkout (nixpkgs' fetchgit) keeps it: the two fetchers hash differently.
    (path / ".gitattributes").write_text("private.txt export-ignore\n")
    (path / "private.txt").write_text("kept by a checkout only\n")
    tool = path / "tool.sh"
    tool.write_bytes(b"#!/bin/sh\n")
    tool.chmod(0o755)
    subprocess.run(git + ["add", "-A"], check=True, timeout=60)
    subprocess.run(git + ["commit", "-qm", "fixture"], check=True, timeout=60)
    subprocess.run(git + ["branch", branch], check=True, timeout=60)
    return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()


def _independent_hash(entry: LockEntry, work: Path) -> Hash:
    """The pin computed without pylmserv: a plain download or git checkout, the standard
    library's unpacking, `nix hash` (which stores nothing, so the builds below still fetch)."""
    from tests.support import oracle

    work.mkdir(parents=True)
    saved = {k: os.environ.get(k) for k in GIT_ENV}
    os.environ.update(GIT_ENV)  # file:// submodules, as for the prefetch subprocess
    try:
        if entry.get("type") == "git":
            tree = oracle.git_tree(entry.url, entry.rev, work / "tree", bool(entry.get("submodules")))
            return oracle.nix_hash(tree)
        got = oracle.download(entry.url, work / "download")
        if entry.mode == "flat":
            return oracle.nix_hash(got, flat=True)
        return oracle.nix_hash(oracle.unpack(got, work / "tree"))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _prefetch(config: Path, lock: Path) -> None:
    """`pylmserv prefetch` as a user runs it: resolves refs, hashes, writes the lock.
    `--via python`: pylmserv's own hashing only, so Nix (the oracle in the tests) has
    neither computed nor stored anything yet."""
    import sys

    env = dict(os.environ, PYLMSERV_HOME=str(config.parent / "home"), **GIT_ENV)
    proc = subprocess.run([sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock),
                           "prefetch", "--via", "python"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"pylmserv prefetch failed ({proc.returncode}):\n{proc.stderr}"


def build_world(tmp: Path, www: Path, base_url: str) -> World:
    """Serve fixtures from `www` (already served at base_url); `pylmserv prefetch` pins them.

    Sources are `url` (unpack) and `git` types: a `github` type always records
    github.com URLs in the lock (pylmserv fetches through PYLMSERV_GITHUB_URL), which
    Nix could not reach here. The catalog's github entries are evaluated, not fetched,
    by the stand-in tests."""
    salt = os.urandom(8)
    stage = tmp / "stage"

    model = b"GGUF" + os.urandom(64 * 1024)
    (www / "models").mkdir()
    (www / "models" / "tiny.gguf").write_bytes(model)

    archives = {}
    for name, owner, repo, ref in (("llama-cpp", "ggml-org", "llama.cpp", "b1"), ("llamafile", "Mozilla-Ocho", "llamafile", "0.1")):
        make_tree = _llamafile_tree if name == "llamafile" else _tree
        tree = make_tree(stage / name, f"{repo}-{ref}", salt + name.encode())
        rel = f"gh/{owner}/{repo}/archive/{ref}.tar.gz"
        _tarball(tree, www / rel)
        archives[name] = f"{base_url}/{rel}"

    (www / "cosmo").mkdir()
    _flat_zip(www / "cosmo" / f"cosmocc-{COSMOCC_VERSION}.zip", salt)
    tool_tree = _tree(stage / "tool", "tool-2.0", salt + b"tool")
    _zip_with_root(tool_tree, www / "zips" / "tool-2.0.zip")
    _git_repo(tmp / "git" / "gadget", salt, "release")
    # A git source with a submodule: builtins.fetchGit { submodules = true; } vs pylmserv.
    sub = gitrepos.make_repo(tmp / "git" / "sub", {"s.c": f"int s; /* {salt.hex()} */\n"})
    top = gitrepos.make_repo(tmp / "git" / "stack", {"t.c": "int t;\n", "run": ("exec", "#!/bin/sh\n")})
    gitrepos.add_submodule(top, sub, "third_party/sub")
    gitrepos.git(top, "branch", "release")

    cosmocc_name = "cosmocc-" + COSMOCC_VERSION.replace(".", "_")
    config = tmp / "project" / "pylmserv.toml"
    config.parent.mkdir()
    config.write_text(f"""
[models.tiny]
url = "{base_url}/models/tiny.gguf"

[sources.llama-cpp]
type = "url"
url = "{archives['llama-cpp']}"
unpack = true

[sources.llamafile]
type = "url"
url = "{archives['llamafile']}"
unpack = true
cosmocc = "{COSMOCC_VERSION}"

[sources.{cosmocc_name}]
type = "url"
url = "{base_url}/cosmo/cosmocc-{COSMOCC_VERSION}.zip"
version = "{COSMOCC_VERSION}"

[sources.tool]
type = "url"
url = "{base_url}/zips/tool-2.0.zip"
unpack = true

[sources.gadget]
type = "git"
url = "{(tmp / 'git' / 'gadget').as_uri()}"
ref = "release"

[sources.stack]
type = "git"
url = "{gitrepos.uri(top)}"
ref = "release"
submodules = true
""")
    flake = copy_flake(tmp / "flake")
    _prefetch(config, flake / "pylmserv.lock")
    lock = load_lock(flake / "pylmserv.lock", missing_ok=False)
    expected = {f"model-{n}": e.hash for n, e in lock.models.items()}
    expected.update({f"source-{n}": e.hash for n, e in lock.sources.items()})
    # What prefetch wrote agrees with a computation that shares no code with pylmserv.
    for name, entry in lock.sources.items():
        assert _independent_hash(entry, tmp / "work" / name) == entry.hash, name
    return World(flake=flake, lock=lock, model_bytes=model, expected=expected, salt=salt.hex())


def set_field(world: World, output: str, key: str, value: str) -> None:
    """Add or replace `key = "value"` in one entry's table of the lock text."""
    entry = world.entry(output)
    kind = "models" if output.startswith("model-") else "sources"
    path = world.flake / "pylmserv.lock"
    lines = path.read_text().splitlines(keepends=True)
    start = lines.index(f"[{kind}.{entry.name}]\n")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [l for l in lines[start + 1:end] if not l.startswith(f"{key} = ")]
    body.insert(0, f'{key} = "{value}"\n')
    path.write_text("".join(lines[:start + 1] + body + lines[end:]))


def set_hash(world: World, output: str, new: str) -> None:
    """Rewrite one entry's hash in the lock text (new may be "" for the empty-hash trick,
    which pylmserv itself would never write)."""
    entry = world.entry(output)
    text = (world.flake / "pylmserv.lock").read_text()
    old = f'hash = "{entry.hash.sri}"'
    assert text.count(old) == 1, f"{output}: hash line not unique in the lock"
    (world.flake / "pylmserv.lock").write_text(text.replace(old, f'hash = "{new}"'))
