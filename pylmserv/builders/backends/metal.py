"""Metal (macOS): Xcode and its `metal` shader compiler; the preflight, the CMake switches
and the doctor's line for it."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import List, Optional

from ...core.errors import UsageError
from ..probe import OK, PROBE_TIMEOUT, WARN, Check, Runner, default_run, which
from . import Switches

NAME = "metal"


@dataclass(frozen=True)
class Xcode:
    developer_dir: Optional[str]
    metal: bool  # the `metal` shader compiler is reachable through xcrun

    @property
    def found(self) -> bool:
        return self.developer_dir is not None

    def describe(self) -> str:
        return f"xcode: {self.developer_dir or 'not found'}; metal compiler: {'yes' if self.metal else 'no'}"


def detect_xcode(env=None, run: Runner = default_run, platform: str = sys.platform) -> Xcode:
    if platform != "darwin":
        return Xcode(None, False)
    sel = which("xcode-select", env)
    dev = None
    if sel:
        rc, out = run([sel, "-p"], PROBE_TIMEOUT)
        dev = out.strip() if rc == 0 and out.strip() else None
    metal = False
    xcrun = which("xcrun", env)
    if xcrun:
        rc, _ = run([xcrun, "--find", "metal"], PROBE_TIMEOUT)
        metal = rc == 0
    return Xcode(dev, metal)


def detect(env=None, run: Runner = default_run, platform: str = sys.platform) -> dict:
    return {"xcode": detect_xcode(env, run, platform)}


def toolkit_found(extra: dict) -> bool:
    return extra["xcode"].found and extra["xcode"].metal


def preflight(extra: dict, nix: str) -> List[str]:
    if not toolkit_found(extra):
        return ["Xcode with the metal compiler (install Xcode, then `xcode-select -s "
                "/Applications/Xcode.app`; the command-line tools alone lack `metal`)"]
    return []


# GGML_METAL_EMBED_LIBRARY: one self-contained binary, no .metal file beside it
SWITCHES = (("{P}_METAL", "ON"), ("{P}_METAL_EMBED_LIBRARY", "ON"))


def options(sw: Switches, req, det) -> None:
    if det.platform != "darwin":
        raise UsageError("the metal backend needs macOS", hint="Use --backend cpu, vulkan, cuda or rocm here.")
    sw.table(SWITCHES)


def gpu_check(env=None, run: Runner = default_run) -> Check:
    """The gpu-metal line (macOS only)."""
    xcode = detect_xcode(env, run, "darwin")
    if xcode.found:
        return Check("gpu-metal", OK, f"Metal via Xcode at {xcode.developer_dir}"
                     + ("" if xcode.metal else " (no `metal` compiler: the embedded library is used)"))
    return Check("gpu-metal", WARN, "Xcode command line tools not found", "xcode-select --install")
