"""The README's quick start, run as written, so it cannot rot.

The commands are parsed out of README.md's quickstart section (never copied here):
  - block 1 (```sh): the one command that sets up and runs the main job on a fresh machine;
  - block 2 (```sh): the test command, which must equal the Tests section's;
  - ```console blocks: the tour, `$ pylmserv ...` lines followed by their real output.

The main job runs in an offline variant (slow: it serves with the real llama-server):
every step runs as written, in a fresh copy of the checkout, with these differences, each
because the machine has no internet: `sudo` is dropped when running as root without sudo;
`python3 -m venv` gets --system-site-packages and `pip install` gets --no-index --no-deps
--no-build-isolation (setup-dev.sh installed the dependencies); the catalog's model and
the llama.cpp source come from loopback mirrors (HF_ENDPOINT and PYLMSERV_CONFIG/LOCK
pointing at a project whose pins are the mirrored files); PYLMSERV_PORT picks a free port.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pylmserv.cli import cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))


def all_tours():
    """The tour of README's quick start and of every docs/ page."""
    return tour(section("quickstart")) + [t for page in DOCS for t in tour(page.read_text())]


def section(name: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- section: {re.escape(name)} \(owner: [^)]*\) -->(.*?)<!-- end: {re.escape(name)} -->", text, re.S)
    assert m, f"README.md has no section {name!r}"
    return m.group(1)


def blocks(text: str, lang: str):
    """Fenced blocks of `lang`; "console" also takes unlabelled blocks that show `$ ` lines."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    return [b.strip("\n") for tag, b in found
            if tag == lang or (lang == "console" and tag == "" and b.startswith("$ "))]


def readme_tests_command() -> str:
    text = README.read_text()
    tests = text.split("## Tests", 1)[1].split("\n## ", 1)[0]
    return blocks(tests, "sh")[0]


def tour(text: str):
    """(argv after `pylmserv`, shown output) for every `$ pylmserv ...` of the console blocks."""
    out = []
    for block in blocks(text, "console"):
        cmd, lines = None, []
        for line in block.splitlines() + ["$ "]:
            if line.startswith("$ "):
                if cmd is not None:
                    out.append((cmd, "\n".join(lines)))
                words = shlex.split(line[2:], comments=True)
                for i, w in enumerate(words):  # pylmserv's own part of a pipeline
                    if w in ("|", "&&", ";", ">", "2>&1"):
                        words = words[:i]
                        break
                cmd = words[1:] if words and words[0] in ("pylmserv", ".venv/bin/pylmserv") else None
                lines = []
            else:
                lines.append(line)
    return out


def parse_command_line(argv):
    """Parse `pylmserv ARGV` as the CLI would (raises on anything it refuses); the
    subcommand's name, or None for global-only lines."""
    ctx = cli.make_context("pylmserv", list(argv), resilient_parsing=False)
    rest = list(getattr(ctx, "_protected_args", []) or getattr(ctx, "protected_args", [])) + list(ctx.args)
    if not rest:
        return None
    name, cmd, args = cli.resolve_command(ctx, rest)
    assert cmd is not None, f"unknown command: pylmserv {' '.join(argv)}"
    with cmd.make_context(name, list(args), parent=ctx, resilient_parsing=False):
        pass
    return name


# -- fast checks ------------------------------------------------------------------------------

def test_quickstart_has_the_two_commands():
    sh = blocks(section("quickstart"), "sh")
    assert len(sh) >= 2, "quickstart needs the main-job command and the test command"
    main, tests = sh[0], sh[1]
    assert len(main.splitlines()) == 1 and "pylmserv serve" in main, "one copy-pasteable line that serves a model"
    assert tests == readme_tests_command() == "bash scripts/setup-dev.sh && python3 -m pytest"


def test_quickstart_model_is_in_the_catalog_and_locked():
    from pylmserv.pins.config import load_project

    model = shlex.split(blocks(section("quickstart"), "sh")[0])[-1]
    project = load_project(REPO / "pylmserv.toml")
    assert model in project.config.models and model in project.lock.models


def test_apt_packages_are_those_setup_dev_installs():
    """The fresh-machine command installs nothing the project's own setup does not (CI runs that)."""
    words = shlex.split(blocks(section("quickstart"), "sh")[0].split("&&")[0])
    pkgs = [w for w in words if not w.startswith("-") and w not in ("sudo", "apt-get", "install")]
    setup = (REPO / "scripts" / "setup-dev.sh").read_text()
    for pkg in pkgs:
        assert re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", setup), f"{pkg} is not in scripts/setup-dev.sh"


def test_tour_covers_every_command_and_parses():
    """Each `$ pylmserv ...` of the tours is a real command line the CLI accepts, and every
    command is shown somewhere (a tour, or a command line of a docs page)."""
    from pylmserv.cli import COMMANDS

    shown = all_tours()
    assert shown, "the tour shows no commands"
    used = set()
    for argv, _ in shown:
        if "--help" in argv or "-h" in argv:
            continue  # its output is compared in the next test
        name = parse_command_line(argv)
        if name:
            used.add(name)
    used |= {parse_command_line(argv) for _, argv in docs_command_lines()}
    # a docs page given to a command: its heading names it (`## \`pylmserv add SPEC ...\``)
    used |= {m for page in DOCS for m in re.findall(r"^#+ `pylmserv ([a-z]+)", page.read_text(), re.M)}
    missing = set(COMMANDS) - used
    assert not missing, f"neither the tour nor a docs page shows: {', '.join(sorted(missing))}"


def test_tour_outputs_that_are_deterministic_match():
    """Where the output depends only on pylmserv (help text, hash conversion), it must match exactly."""
    checked = 0
    for argv, shown in all_tours():
        if argv in (["--help"],) or (argv[:1] == ["hash"] and "--to" in argv):
            proc = subprocess.run([sys.executable, "-m", "pylmserv", *argv], capture_output=True, text=True,
                                  cwd=REPO, timeout=60, env=dict(os.environ, COLUMNS="80", NO_COLOR="1"))
            assert proc.returncode == 0
            assert (proc.stdout + proc.stderr).strip() == shown.strip(), f"README output of `pylmserv {' '.join(argv)}` is stale"
            checked += 1
    assert checked >= 1


# -- the main job, offline variant (slow) -------------------------------------------------------

def _offline_step(words, root_without_sudo: bool):
    if words[0] == "sudo" and root_without_sudo:
        words = words[1:]
    if words[:3] == ["python3", "-m", "venv"]:
        words = [sys.executable, "-m", "venv", "--system-site-packages"] + words[3:]
    elif len(words) >= 2 and words[0].endswith("/pip") and words[1] == "install":
        words = words[:2] + ["--no-index", "--no-deps", "--no-build-isolation", "-q"] + words[2:]
    return words


def _copy_checkout(dest: Path) -> Path:
    """A fresh copy of the checkout: tracked and untracked-but-not-ignored files."""
    proc = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:  # not a git checkout (e.g. an unpacked tarball): copy the tree
        skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", ".pytest_cache")
        shutil.copytree(REPO, dest, ignore=skip)
        return dest
    for rel in filter(None, proc.stdout.split("\n")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
def test_quickstart_main_job_offline_variant(tmp_path):
    from pylmserv.pins.config import LockEntry, load_lock, load_project
    from pylmserv.core.hashing import file_hash
    from tests.support import llama_source
    from tests.support.httpserver import serve_directory
    from tests.support.tinymodel import tiny_model
    from tests.test_serve import alive, free_port, wait_for
    from tests.test_serve_e2e import pids_running, _source_tree

    main = blocks(section("quickstart"), "sh")[0]
    steps = [shlex.split(s) for s in main.split("&&")]
    assert steps[-1][0].endswith("pylmserv") and steps[-1][1] == "serve"
    model_name = steps[-1][-1]

    built = llama_source.built_llama_cpp()  # the session's one llama.cpp build
    checkout = _copy_checkout(tmp_path / "checkout")

    # Loopback mirror of the Hub serving a tiny model under the catalog entry's own URL path,
    # and a project pinning it (plus the vendored llama.cpp source the build used).
    real = load_project(REPO / "pylmserv.toml").lock.models[model_name]
    www = tmp_path / "hub"
    model = tiny_model(tmp_path, _source_tree(built["lock"]))
    url_path = real.url.split("://", 1)[1].split("/", 1)[1]
    (www / url_path).parent.mkdir(parents=True)
    shutil.copy(model, www / url_path)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "pylmserv.toml", project / "pylmserv.toml")
    lock = load_lock(Path(built["lock"]))
    lock = lock.with_entry(LockEntry("models", model_name, real.url, file_hash(model), "flat", rev=real.rev,
                                     size=model.stat().st_size, extra=dict(real.extra)))
    lock.write(project / "pylmserv.lock")

    # A fresh home that shares only the build tree and the source it was built from (so
    # serve's build is a cache hit: an up-to-date build whose source is gone fetches it back).
    home = tmp_path / "home"
    home.mkdir()
    for shared in ("builds", "sources"):
        (home / shared).symlink_to(llama_source.PERSISTENT_HOME / shared)
    port = free_port()
    root_without_sudo = os.geteuid() == 0 and shutil.which("sudo") is None

    with serve_directory(www) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub, PYLMSERV_HOME=str(home), PYLMSERV_PORT=str(port),
                   PYLMSERV_CONFIG=str(project / "pylmserv.toml"), PYLMSERV_LOCK=str(project / "pylmserv.lock"),
                   NO_COLOR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                   # The README's fresh machine has no OpenBLAS, so serve's `auto` is cpu there;
                   # this test machine has it (the blas tests), and the session's build is cpu.
                   PYLMSERV_BACKEND="cpu")
        env.pop("SOURCE_DATE_EPOCH", None)
        for words in steps[:-1]:
            words = _offline_step(words, root_without_sudo)
            proc = subprocess.run(words, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"README step failed: {' '.join(words)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        serve = subprocess.Popen(steps[-1], cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            seen = []
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                line = serve.stderr.readline()
                if not line:
                    break
                seen.append(line)
                if "Press Ctrl-C" in line:
                    break
            assert any("Press Ctrl-C" in s for s in seen), "serve never became ready:\n" + "".join(seen[-40:])
            assert any(f"web UI:                 http://127.0.0.1:{port}/" in s for s in seen)
            assert not any("configuring llama.cpp" in s for s in seen)  # reused the session's build
            assert any(f"http://127.0.0.1:{port}/v1" in s for s in seen)
            servers = pids_running(str(home / "models"))
            assert servers
            body = b'{"prompt": "Hello", "n_predict": 4}'
            req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                assert resp.status == 200
            serve.send_signal(signal.SIGINT)
            serve.communicate(timeout=60)
        finally:
            if serve.poll() is None:
                serve.kill()
                serve.communicate()
    assert serve.returncode == 130
    assert wait_for(lambda: not any(alive(p) for p in servers), timeout=10)
    assert (home / "models" / model_name).is_dir()  # fetched into the fresh store, verified


# -- docs/: the reference pages ------------------------------------------------------------------

def test_readme_links_every_docs_page_and_every_link_resolves():
    """README stays the newcomer's page: it links each docs/ page, and no relative link of
    README or of a page points at a file that does not exist."""
    text = README.read_text()
    for page in DOCS:
        assert f"docs/{page.name}" in text, f"README does not link docs/{page.name}"
    for doc in [README] + DOCS:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links {target}, which does not exist"


def docs_command_lines():
    """(page, argv) for every `pylmserv ...` line of a ```sh block in docs/ (placeholders in
    CAPITALS, synopses and lines with shell syntax beyond comments are skipped)."""
    for page in DOCS:
        for block in blocks(page.read_text(), "sh"):
            for line in block.replace("\\\n", " ").splitlines():
                try:
                    words = shlex.split(line, comments=True) if line.strip() else []
                except ValueError:  # shell quoting beyond a single command line
                    continue
                if not words or words[0] != "pylmserv" or any(w in ("|", "&&", ";", ">") for w in words):
                    continue
                if any(re.fullmatch(r"[A-Z][A-Z_]+|\[.*|.*\|.*|.*\]", w) for w in words[1:]):
                    continue  # a synopsis (NAME, [--opt], a|b), not a command line
                yield page, words[1:]


def test_docs_commands_parse():
    """Every command line of the docs pages' ```sh blocks is one the CLI accepts."""
    checked = 0
    for page, argv in docs_command_lines():
        try:
            parse_command_line(argv)
        except Exception as exc:
            raise AssertionError(f"{page.name}: pylmserv {' '.join(argv)}: {exc}") from None
        checked += 1
    assert checked >= 5
