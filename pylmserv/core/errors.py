"""One exception family: a user-facing message, a hint, an exit code."""
from __future__ import annotations



class PylmservError(Exception):
    """An error the CLI prints as one line plus a hint (traceback only with -v)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(PylmservError):
    """Bad input from the user: arguments, config, lock (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """pylmserv.toml or pylmserv.lock is malformed or inconsistent."""


class HashError(UsageError):
    """A hash string that cannot be parsed."""


class NetworkError(PylmservError):
    """Unreachable host, HTTP error, timeouts (exit 3)."""

    exit_code = 3


class VerificationError(PylmservError):
    """Downloaded or built content does not match its pin (exit 4)."""

    exit_code = 4


class RotFound(VerificationError):
    """`pylmserv verify` found bad store entries (they were moved aside): exit 4."""


class RetaggedError(VerificationError):
    """An upstream tag now names another commit than the one locked (`update` refuses to move)."""


class ToolMissingError(PylmservError):
    """A required external tool (cmake, nvcc, nix, ...) is absent (exit 5)."""

    exit_code = 5


class BuildError(PylmservError):
    """An external build step failed (exit 6)."""

    exit_code = 6


# -- specific kinds, each under the class that fixes its exit code ------------------------

class NarError(UsageError, ValueError):
    """A path that cannot be serialised (fifo, socket, device) or changed while read."""


class UnsafeArchiveError(VerificationError):
    """A member would escape the target or is of a type we refuse to write."""


class ZipFormatError(UsageError):
    """A file that should be an APE/ZIP (a llamafile) has no readable ZIP structure."""


class DiskSpaceError(PylmservError):
    """Not enough free space (before starting, or ENOSPC while writing)."""

    exit_code = 1


class HubNotFound(NetworkError):
    """The Hub answered 404."""


class GitError(NetworkError):
    """A git command failed; the message quotes git's own fatal/error line."""

    def __init__(self, args: list[str], stderr: str):
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith(("fatal:", "error:"))), lines[-1] if lines else "")
        super().__init__(f"git {args[0]} failed: {last}", hint="Check the git URL, the ref and your network access.")
        self.stderr = stderr


EXIT_CODES = {
    0: "success",
    1: "unexpected error",
    2: "bad input (arguments, config, lock)",
    3: "network (unreachable, HTTP error)",
    4: "verification failed (hash, size, drift)",
    5: "a required tool is missing",
    6: "a build step failed",
    10: "update: pins were (with --dry-run: would be) updated",
    130: "interrupted",
}


class Demote(Exception):
    """Internal signal of the download scheduler, never shown to a user: a 403/429 on a
    parallel range makes that worker stop, so fewer connections remain."""
