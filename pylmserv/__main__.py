"""`pylmserv` and `python -m pylmserv`."""
from __future__ import annotations

import sys


def main(argv=None) -> None:
    from .cli import main as cli_main

    cli_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
