"""Linking CUDA code so it loads on a real machine, and proving it did.

ggml's CUDA code calls the driver API (cuDeviceGet, cuMemCreate, ...), so it must be linked
against libcuda; toolkits assembled from NVIDIA's PyPI wheels ship no stubs/libcuda.so to
link against, so one is written here (SONAME libcuda.so.1; link time only). After linking,
binutils' readelf and nm check that every undefined cu*/cublas* symbol is provided by a
NEEDED library: a module that misses one fails dlopen on every machine.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.errors import BuildError
from .probe import PROBE_TIMEOUT, Runner, default_run
from .toolchain import detect_compilers

# -- ELF inspection (binutils' readelf and nm): does a built module link what it uses? --------

def elf_needed(path: Path, run: Runner = default_run) -> List[str]:
    """DT_NEEDED entries (`readelf -d`)."""
    rc, out = run(["readelf", "-d", str(path)], PROBE_TIMEOUT)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out) if rc == 0 else []


def elf_soname(path: Path, run: Runner = default_run) -> Optional[str]:
    rc, out = run(["readelf", "-d", str(path)], PROBE_TIMEOUT)
    m = re.search(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", out) if rc == 0 else None
    return m.group(1) if m else None


def elf_symbols(path: Path, defined: bool, run: Runner = default_run) -> List[str]:
    """Dynamic symbols of `path`: undefined ones (`nm -D --undefined-only`) or defined ones."""
    flag = "--defined-only" if defined else "--undefined-only"
    rc, out = run(["nm", "-D", flag, str(path)], PROBE_TIMEOUT)
    if rc != 0:
        return []
    names = []
    for line in out.splitlines():
        parts = line.split()
        if parts and (defined and len(parts) >= 3 and parts[1] not in ("U", "w", "v") or not defined and parts[0] in ("U", "w")):
            names.append(parts[-1].split("@")[0])
    return names


def unprovided_symbols(dso: Path, pattern: str, search_dirs: Sequence[Path],
                       run: Runner = default_run) -> Tuple[List[str], Dict[str, str]]:
    """Undefined symbols of `dso` matching `pattern` that no NEEDED library provides.

    NEEDED names are looked up in `search_dirs` (by file name, or by the SONAME of the
    link-time file: a driver stub libcuda.so carries SONAME libcuda.so.1). Returns
    (unprovided symbol names, NEEDED name -> file it was found as)."""
    wanted = [s for s in elf_symbols(dso, defined=False, run=run) if re.match(pattern, s)]
    found: Dict[str, str] = {}
    provided = set()
    for needed in elf_needed(dso, run=run):
        for d in search_dirs:
            cands = [Path(d) / needed] + sorted(Path(d).glob(needed.split(".so")[0] + ".so*"))
            hit = next((c for c in cands if c.is_file() and (c.name == needed or elf_soname(c, run) == needed)), None)
            if hit is not None:
                found[needed] = str(hit)
                provided.update(elf_symbols(hit, defined=True, run=run))
                break
    return sorted(s for s in wanted if s not in provided), found


def elf_symbols_of_object(path: Path, run: Runner = default_run) -> List[str]:
    """Undefined symbols of a relocatable object (`nm -u`; objects have no dynamic table)."""
    rc, out = run(["nm", "-u", str(path)], PROBE_TIMEOUT)
    return [ln.split()[-1] for ln in out.splitlines() if ln.strip()] if rc == 0 else []


# -- the CUDA driver stub: link against libcuda where the toolkit ships no stubs/ -----------------

def cuda_header_driver_symbols(cuda_h: Path) -> List[str]:
    """Every driver API function cuda.h declares, under both its plain and its versioned
    name (`#define cuMemAlloc cuMemAlloc_v2`: the library exports the latter)."""
    text = Path(cuda_h).read_text(encoding="utf-8", errors="replace")
    names = set(re.findall(r"\bCUDAAPI\s+(cu[A-Z]\w*)\s*\(", text))
    names.update(re.findall(r"^\s*#\s*define\s+cu[A-Z]\w*\s+(cu[A-Z]\w*)\s*$", text, re.M))
    return sorted(names)


def write_cuda_driver_stub(names: Sequence[str], stub: Path, cc: Optional[str] = None) -> Path:
    """A link-time stand-in for the driver's libcuda.so: a tiny shared object with SONAME
    libcuda.so.1 exporting `names` (what a toolkit's stubs/libcuda.so is). Binaries record
    NEEDED libcuda.so.1; at run time the driver's own library is loaded, never this one."""
    bad = [n for n in names if not re.fullmatch(r"cu[A-Z]\w*", n)]
    if bad:
        raise BuildError(f"refusing to write a libcuda stub with odd symbol names: {', '.join(bad[:3])}")
    stub = Path(stub)
    stub.parent.mkdir(parents=True, exist_ok=True)
    c_file = stub.parent / "libcuda-stub.c"
    c_file.write_text("/* pylmserv: link-time stub of the CUDA driver (SONAME libcuda.so.1); never loaded. */\n"
                      + "".join(f"void {n}(void) {{}}\n" for n in names))
    cc = cc or detect_compilers()[0].path or "cc"
    tmp = stub.with_name(stub.name + ".tmp")
    rc, out = default_run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(c_file)], 300)
    if rc != 0 or not tmp.is_file():
        raise BuildError(f"cannot build the libcuda link stub with {cc}: {out.strip()[:300]}")
    os.replace(tmp, stub)
    return stub


GPU_SYMBOLS = r"cu[A-Z]|cublas"  # driver API and cuBLAS (the runtime's cuda* may be static)


def check_gpu_links(dso: Path, search_dirs) -> None:
    """Every undefined cu*/cublas* symbol of `dso` must come from a NEEDED library, or
    dlopen fails on every real machine (checked with readelf -d and nm -D)."""
    missing, found = unprovided_symbols(dso, GPU_SYMBOLS, list(search_dirs) + _system_lib_dirs())
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise BuildError(f"{dso.name} leaves {shown} undefined and no NEEDED library "
                         f"({', '.join(sorted(found)) or 'none'}) provides them: dlopen would fail",
                         hint="The link line needs -lcuda (and -lcublas with cuBLAS); this is a pylmserv bug, "
                              "please report it with the build log.")


def _system_lib_dirs() -> List[Path]:
    return [Path(d) for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib")
            if Path(d).is_dir()]
