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

    from .core.nar import hash_path

    path = _as_path_names_it(args[1])
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


def _as_path_names_it(arg: str) -> str:
    """The file `Path(arg)` (cli/hash.py) names, without importing pathlib (a fifth of this
    path's start): Path drops a trailing '/' or '/.', which would make lstat follow a link
    in the last place; '//' and '/./' elsewhere name the same file either way."""
    while True:
        if len(arg) > 1 and arg.endswith("/"):
            arg = arg[:-1]
        elif len(arg) > 2 and arg.endswith("/."):
            arg = arg[:-2]
        else:
            return arg


if __name__ == "__main__":
    main()
