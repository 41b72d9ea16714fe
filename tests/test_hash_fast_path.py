"""`pylmserv hash PATH` (no options) is answered by pylmserv/__main__.py without importing the
command line (click); what it prints must be what the full command prints, and anything
else (an option, a missing path) must still be the full command's answer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli

REPO = str(Path(__file__).resolve().parent.parent)
MAIN = ("import sys\nfrom pylmserv.__main__ import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
        "    sys.stderr.write('\\nclick loaded: %s\\n' % ('click' in sys.modules))\n")
FULL = "import sys\nfrom pylmserv.cli import main\nmain(sys.argv[1:])\n"


def run(code, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def make_tree(root: Path) -> Path:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f.txt").write_bytes(b"x" * 1000)
    (root / "d" / "e" / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "d" / "e" / "run.sh", 0o755)
    (root / "d" / "empty").write_bytes(b"")
    os.symlink("f.txt", root / "d" / "link")
    os.symlink("nowhere", root / "dangling")
    os.symlink("d", root / "dirlink")  # with a trailing '/' or '/.', only pathlib's reading keeps it a link
    return root


def test_plain_hash_skips_the_command_line_and_prints_what_it_prints(tmp_path):
    root = make_tree(tmp_path / "t")
    for target in (root, root / "d", root / "d" / "f.txt", root / "d" / "link", root / "dangling",
                   str(root) + "/", str(root / "dirlink") + "/", str(root / "dirlink") + "/./.",
                   str(root / "d") + "//./f.txt"):
        fast, full = run(MAIN, "hash", target), run(FULL, "hash", target)
        assert fast.returncode == 0 == full.returncode, (fast.stderr, full.stderr)
        assert "click loaded: False" in fast.stderr
        assert fast.stdout == full.stdout and fast.stdout.startswith("sha256-")


def test_options_and_errors_are_the_full_commands(tmp_path):
    root = make_tree(tmp_path / "t")
    with_option = run(MAIN, "hash", "--format", "nix32", root)
    assert with_option.returncode == 0 and "click loaded: True" in with_option.stderr
    assert with_option.stdout.strip() == run(FULL, "hash", "--format", "nix32", root).stdout.strip()
    missing = run_cli("hash", tmp_path / "nope")
    assert missing.returncode == 2 and missing.stdout == ""
    assert "error: no such file or directory" in missing.stderr and "hint:" in missing.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused = run(MAIN, "hash", fifo)  # exists, but no NAR can hold it: the full command's one-line error
    assert refused.returncode != 0 and "click loaded: True" in refused.stderr
    assert "error:" in refused.stderr and "Traceback" not in refused.stderr
