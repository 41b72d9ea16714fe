"""Logging is loaded only when a line is written (pylmserv/core/log.py, issue 18).

An up-to-date `pylmserv build` writes nothing at the default level, so it must not pay for
`import logging`; a line that is written looks exactly as before: on stderr, control
characters escaped, -v adding debug lines and -q keeping only warnings and errors.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylmserv.core import log as core_log
from tests.test_build_uptodate import stamped  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "pylmserv"


def run_py(code: str, *args, env=None):
    full = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=300)


def test_an_unwritten_line_loads_no_logging():
    code = ("import sys\n"
            "import pylmserv.cli, pylmserv.builders, pylmserv.builders.base, pylmserv.pins.config\n"
            "from pylmserv.core.log import DEBUG, INFO, configure, get_logger\n"
            "configure(INFO)\n"
            "log = get_logger('pylmserv.build')\n"
            "log.debug('up to date: %s', 'x')\n"
            "assert log.isEnabledFor(INFO) and not log.isEnabledFor(DEBUG)\n"
            "print('logging' in sys.modules)\n")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False" and proc.stderr == ""


# main() exits through sys.exit; whatever happens, say afterwards whether logging was loaded.
MAIN = ("import sys\nfrom pylmserv.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
        "    sys.stderr.write('\\nlogging loaded: %s\\n' % ('logging' in sys.modules))\n")


def test_an_up_to_date_build_loads_no_logging_and_says_so_with_v(stamped):  # noqa: F811
    _, args, env, marker = stamped
    quiet = run_py(MAIN, *args, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines()[-1] == "logging loaded: False" and "up to date: " not in quiet.stderr
    assert not marker.exists()
    verbose = run_py(MAIN, "-v", *args, env=env)
    assert verbose.returncode == 0, verbose.stderr
    assert "up to date: " in verbose.stderr and "logging loaded: True" in verbose.stderr


# A command that writes one line at each level, reached through the real group, options and
# _setup_logging (the group imports pylmserv.cli.<name>: here a module made on the spot).
SAY = r"""
import sys, types, click
from pylmserv import cli as cli_pkg
from pylmserv.core.log import get_logger

@click.command("say")
def command():
    log = get_logger("pylmserv.say")
    log.debug("debug line")
    log.info("info line")
    if "--warn" in sys.argv:
        log.warning("warning line \x1b[2J\x07 name\tend")

mod = types.ModuleType("pylmserv.cli.say")
mod.command = command
sys.modules["pylmserv.cli.say"] = mod
cli_pkg.COMMANDS["say"] = ("say", "Say things.")
argv = [a for a in sys.argv[1:] if a != "--warn"]
try:
    cli_pkg.main(argv)
finally:
    sys.stderr.write("logging loaded: %s\n" % ("logging" in sys.modules))
"""


def say(*args):
    proc = run_py(SAY, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


def test_levels_follow_v_and_q():
    assert say("say") == ["info line", "logging loaded: True"]
    assert say("-v", "say") == ["debug line", "info line", "logging loaded: True"]
    # -q: nothing below a warning is written, and so logging is never loaded
    assert say("-q", "say") == ["logging loaded: False"]
    assert say("-q", "say", "--warn")[:-1] == ["warning line \\x1b[2J\\x07 name\tend"]


def test_a_warning_is_written_escaped_on_stderr_after_configure():
    code = ("import sys\n"
            "from pylmserv.core.log import INFO, configure, get_logger\n"
            "configure(INFO)\n"
            "assert 'logging' not in sys.modules\n"
            "get_logger('pylmserv.models').warning('message %s', 'a\\x1b]0;pwned\\x07b')\n"
            "import logging\n"
            "root = logging.getLogger('pylmserv')\n"
            "print(root.level, root.propagate, len(root.handlers), root.handlers[0].stream is sys.stderr)\n")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "message a\\x1b]0;pwned\\x07b\n"
    assert proc.stdout.split() == ["20", "False", "1", "True"]


def test_without_configure_it_is_logging_getLogger():
    # Library use: loaded at the first call, no handler of ours; logging's own last resort
    # prints a warning, and a debug line is dropped as logging.getLogger(name) would.
    code = ("import sys\n"
            "from pylmserv.core.log import get_logger\n"
            "log = get_logger('pylmserv.store')\n"
            "assert 'logging' not in sys.modules\n"
            "log.debug('dropped')\n"
            "import logging\n"
            "assert 'logging' in sys.modules\n"
            "log.warning('kept')\n"
            "root = logging.getLogger('pylmserv')\n"
            "print(root.handlers, root.propagate, log.getEffectiveLevel(), log.parent is root)\n")
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "kept\n"
    assert proc.stdout.split() == ["[]", "True", "30", "True"]


@pytest.fixture
def pylmserv_logger():
    """The "pylmserv" logger as it was, put back after the test (configure() changes it)."""
    import logging

    root = logging.getLogger("pylmserv")
    saved = (root.handlers[:], root.level, root.propagate)
    yield root
    root.handlers[:], root.level, root.propagate = saved
    core_log._pending = None


def test_configure_in_process_writes_to_the_stderr_of_the_call(pylmserv_logger, capsys):
    # logging is loaded already here (pytest): configure installs at once, as the CLI used to.
    core_log.configure(core_log.WARNING)
    assert core_log._pending is None and pylmserv_logger.propagate is False
    log = core_log.get_logger("pylmserv.fetch")
    log.info("hidden")
    log.error("shown \x1b[31m")
    assert capsys.readouterr().err == "shown \\x1b[31m\n"


def test_a_record_names_the_caller_not_the_proxy(caplog):
    import logging

    real = logging.getLogger("pylmserv.test-log")
    real.addHandler(caplog.handler)  # an in-process CLI run may have stopped propagation:
    real.propagate = False            # then only this handler, and always only this one
    try:
        with caplog.at_level(logging.DEBUG, logger="pylmserv.test-log"):
            log = core_log.get_logger("pylmserv.test-log")
            log.debug("d")
            log.log(logging.INFO, "i")
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("e")
    finally:
        real.removeHandler(caplog.handler)
        real.propagate = True
    records = [r for r in caplog.records if r.name == "pylmserv.test-log"]
    assert [r.getMessage() for r in records] == ["d", "i", "e"]
    assert {(r.pathname, r.funcName) for r in records} == {(__file__, "test_a_record_names_the_caller_not_the_proxy")}
    assert records[-1].exc_info and records[-1].levelname == "ERROR"
    assert log.handlers is real.handlers  # anything else is the real logger's (__getattr__)


def modules_importing_logging() -> list:
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "core" / "log.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "logging" or n.startswith("logging.") for n in names):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_only_core_log_imports_logging():
    """Any other `import logging` would write past a configuration still pending (and pay
    for the import on the up-to-date path): loggers come from core.log.get_logger."""
    assert modules_importing_logging() == []
