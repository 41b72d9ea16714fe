"""`pylmserv` and `python -m pylmserv`: an up-to-date build is answered from its record
(store/replay.py) before the command line (click) and the builders are imported."""
from __future__ import annotations

import sys


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    from .store import replay

    if replay.replay(args):
        return
    from .cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":
    main()
