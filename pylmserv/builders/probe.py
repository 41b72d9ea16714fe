"""How the machine is probed, and how a finding is judged: the pieces every backend module
(builders/backends/) and the generic detection (builders/toolchain.py) share.

A detector takes an optional `env` (whose PATH is searched) and `run` (how to run a probe
command: `(argv, timeout) -> (returncode, output)`), so tests and doctor point it at a
machine of their own. Nothing here raises for a missing tool: absence is data
(`found=False`); the build's preflight turns it into an error, doctor into a `Check`.
"""
from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from ..core.proc import probe, which  # noqa: F401 (which: the detectors' PATH lookup)

Runner = Callable[[Sequence[str], float], Tuple[int, str]]

PROBE_TIMEOUT = 20.0


def default_run(argv: Sequence[str], timeout: float = PROBE_TIMEOUT) -> Tuple[int, str]:
    """Run a probe; (returncode, stdout+stderr). Never raises for a missing/broken tool."""
    proc = probe(argv, timeout=timeout)
    if proc is None:
        return 127, f"cannot run {argv[0]}"
    return proc.returncode, proc.stdout + proc.stderr


def parse_version(text: str) -> Optional[Tuple[int, ...]]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


def version_str(v: Optional[Tuple[int, ...]]) -> str:
    return ".".join(map(str, v)) if v else "?"


@dataclass(frozen=True)
class Tool:
    """One external tool: where it is and what version it reports."""

    name: str
    path: Optional[str] = None
    version: Optional[Tuple[int, ...]] = None
    origin: str = "system"  # system | pip-wheel | env
    detail: str = ""

    @property
    def found(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        if not self.found:
            return f"{self.name}: not found"
        ver = f" {version_str(self.version)}" if self.version else ""
        origin = f" ({self.origin})" if self.origin != "system" else ""
        return f"{self.name}{ver}: {self.path}{origin}"


def probe_tool(name: str, args: Sequence[str] = ("--version",), env=None, run: Runner = default_run,
               exe: Optional[str] = None, origin: str = "system") -> Tool:
    path = exe or which(name, env)
    if not path:
        return Tool(name)
    rc, out = run([path, *args], PROBE_TIMEOUT)
    first = next((ln.strip() for ln in out.splitlines() if ln.strip()), "")
    return Tool(name, path, parse_version(out) if rc == 0 else None, origin, first)


@dataclass(frozen=True)
class Library(Tool):
    """A library found on disk: `path` is the file; `include` its headers when they are elsewhere."""

    include: Optional[str] = None

    @property
    def libdir(self) -> Optional[str]:
        return str(Path(self.path).parent) if self.path else None

    def link_args(self, lib: str) -> List[str]:
        """-L/-l for this library; `-l:libX.so.N` when only the versioned file exists (the
        NVIDIA PyPI wheels ship libcublas.so.13 without the libcublas.so link)."""
        if not self.path:
            return [f"-l{lib}"]
        name = Path(self.path).name
        flag = f"-l{lib}" if name in (f"lib{lib}.so", f"lib{lib}.a") else f"-l:{name}"
        return [f"-L{self.libdir}", flag]


def python_lib_dirs() -> List[Path]:
    """site-packages directories of this Python (where `pip install nvidia-cublas` puts it)."""
    import site

    dirs = [Path(p) for p in sys.path if p and p.endswith(("site-packages", "dist-packages"))]
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
        dirs.append(Path(site.getusersitepackages()))
    except AttributeError:  # virtualenv's old site module
        pass
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


# -- judging: one line of `pylmserv doctor` ---------------------------------------------------

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report. `hint` says what to do; empty when status is ok."""

    name: str
    status: str  # ok | warn | fail
    detail: str
    hint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def toolkit_missing(name: str, gpu: str, missing: str, backend_label: str, requested: bool, hint: str) -> Check:
    """A backend's toolkit line when its compiler is absent: a failure when that backend was
    asked for, else a warning (a GPU without its toolkit can still use another backend)."""
    return Check(name, FAIL if requested else WARN,
                 f"{gpu}, {missing}" + (f"; {backend_label} was requested" if requested else ""), hint)
