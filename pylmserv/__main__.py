"""`pylmserv` and `python -m pylmserv`. `pylmserv hash PATH`, the plain form, is answered
without the command line's imports (_hash_path)."""
from __future__ import annotations

import sys


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if _hash_path(args):
        return
    from .cli import main as cli_main

    cli_main(args)


def _hash_path(args) -> bool:
    """`pylmserv hash PATH` with no option: print the hash (what cli/hash.py prints for it)
    without importing click and the command line, which cost about as much as hashing a
    small tree. Anything else - an option, a missing path, any error - returns False and
    the full command runs, which parses, hashes and reports as usual."""
    if len(args) != 2 or args[0] != "hash" or args[1].startswith("-"):
        return False
    import os
    from pathlib import Path

    from .core.nar import hash_path

    path = Path(args[1])  # as cli/hash.py: the same normalisation of the argument
    try:
        if not os.path.lexists(path):
            return False
        text = hash_path(path).format("sri")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception:  # the full command reports it (one line and a hint, its exit code)
        return False
    sys.stdout.write(text + "\n")
    return True


if __name__ == "__main__":
    main()
