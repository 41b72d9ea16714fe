"""Make the clean venv the start-up benchmarks run in: pylmserv's runtime dependencies only,
as `pipx install pylmserv` or a Nix wrapper would give it, without this machine's site-packages
(whose .pth files import modules at every Python start and make every start slower).

    python3 benchmarks/clean_venv.py /tmp/pylmserv-venv
    /tmp/pylmserv-venv/bin/python benchmarks/bench_build.py --only uptodate

The benchmarks put the checkout on PYTHONPATH themselves, so pylmserv is not installed here.
pytest is: the benchmarks reuse the test suite's fixtures (it adds no .pth file, so no start
of Python imports it).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    venv = Path(sys.argv[1])
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"] + ["pytest"]
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *deps], check=True)
    print(venv / "bin" / "python")
    return 0


if __name__ == "__main__":
    sys.exit(main())
