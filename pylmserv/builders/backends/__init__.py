"""One module per GPU/BLAS backend: cuda, rocm, vulkan, metal, blas.

Each module owns everything about its backend that more than one command needs: the
detection (tools, libraries, devices), what the build's preflight requires
(`preflight(extra, nix) -> [missing...]`), its CMake switches for llama.cpp (a table
`SWITCHES` plus `options(switches, req, det)` for what depends on the machine or the
user), and the lines `pylmserv doctor` prints for it. The build (builders/llama_cpp.py,
builders/__init__.py), `--backend auto` (builders/auto.py) and doctor (app/doctor.py)
all ask the same module, so they agree. builders/toolchain.py keeps what is not one
backend's: cmake, ninja, compilers, ccache, OpenSSL headers, which GPU vendors exist.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass
class Switches:
    """The -D switches being assembled for one llama.cpp tree. `features` is the tree's
    SourceFeatures (what its CMake files declare); `put` sets a switch only when the tree
    declares it (or it is a CMAKE_ variable), `set` always."""

    features: object
    defines: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """GGML (since b3173) or LLAMA (before): the prefix of backend switches."""
        return self.features.ggml

    def has(self, name: str) -> bool:
        return self.features.has(name)

    def put(self, name: str, value: str) -> None:
        if self.features.has(name) or name.startswith("CMAKE_"):
            self.defines[name] = value

    def set(self, name: str, value: str) -> None:
        self.defines[name] = value

    def table(self, rows: Sequence[Tuple[str, str]]) -> None:
        """A backend's fixed switches; `{P}` in a name is the tree's prefix (GGML or LLAMA)."""
        for name, value in rows:
            self.put(name.format(P=self.prefix), value)


def split_list(text: Optional[str]) -> List[str]:
    """"86;89", "86,89" or "86 89" -> ["86", "89"] (--cuda-arch, --gpu-targets)."""
    return [p.strip() for p in re.split(r"[;,\s]+", text or "") if p.strip()]
