"""The backend builds that do not fit in CI, run by scripts/backends-check.sh.

Each row builds llama.cpp (or llamafile's GPU module) with `pylmserv build` from a lock
that pins a real source served on 127.0.0.1, then runs what can run here: the tiny model
on the CPU, on OpenBLAS, on lavapipe (Vulkan on the CPU) with every layer offloaded.
Builds use the persistent PYLMSERV_HOME and ccache under ~/.cache/pylmserv-tests, so a
rerun is a cache hit; the cold build time shown is the one the build's stamp recorded.

    python3 -m tests.support.backends_check [--only vulkan,blas,...] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from pylmserv.core.hashing import Hash
from pylmserv.pins.config import Lock, LockEntry
from tests.support import llama_source
from tests.support.httpserver import serve_directory
from tests.support.tinymodel import tiny_model
from tests.test_llamafile_cuda_module import FIXTURE, PINNED

VULKAN_SDIST = "0.3.9"  # llama-cpp-python 0.3.9 (May 2025): its llama.cpp builds with Debian 12's Vulkan headers
CURRENT = llama_source.SDIST_VERSION


@dataclass
class Row:
    backend: str
    compiled: str = "no"
    ran: str = "no"
    cold_build: str = "-"
    checked: List[str] = field(default_factory=list)

    def markdown(self) -> str:
        return f"| {self.backend} | {self.compiled} | {self.ran} | {self.cold_build} | {'; '.join(self.checked)} |"


def log(msg: str) -> None:
    print(f"[backends-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(version: str, backend: str, *extra: str, targets=("llama-cli", "llama-server"), timeout: float = 4 * 3600):
    """`pylmserv build` of llama-cpp-python `version`'s llama.cpp: (returncode, json or None, stderr)."""
    work = Path(tempfile.mkdtemp(prefix=f"backends-{backend}-"))
    with llama_source.served_project(work, version=version) as (config, lock, _):
        argv = [sys.executable, "-m", "pylmserv", "--config", str(config), "--lock", str(lock), "build", "--json",
                "--backend", backend, "-j", os.environ.get("PYLMSERV_TEST_JOBS", "2"), *extra]
        for t in targets:
            argv += ["--target", t]
        log(f"building llama.cpp {version} --backend {backend} {' '.join(extra)}")
        proc = subprocess.run(argv, capture_output=True, text=True, env=llama_source.build_env(), timeout=timeout)
    doc = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None
    return proc.returncode, doc, proc.stderr


def cold_seconds(doc: dict) -> str:
    """The build time the stamp recorded (the cold build), as m:ss."""
    try:
        stamp = json.loads((Path(doc["build_dir"]) / "pylmserv-stamp.json").read_text())
        s = float(stamp["seconds"])
    except (OSError, ValueError, KeyError):
        s = float(doc.get("seconds", 0))
    return f"{int(s // 60)} min {int(s % 60):02d} s"


def generate(cli: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    help_text = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=60).stdout
    one_shot = ["-st"] if "--single-turn" in help_text else ["-no-cnv"]
    return subprocess.run([str(cli), "-m", str(model), "-p", "Hello", "-n", "16", *one_shot, "--temp", "0",
                           "--seed", "1", "-t", "2", "-c", "256", *extra], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=600)


def needed(path: Path) -> List[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def source_tree(version: str) -> Path:
    """The verified tree in the store (named by its NAR hash): the model's vocabulary is in it."""
    return llama_source.PERSISTENT_HOME / "sources" / f"{llama_source.tarball_nar_hash(version).nix32}-llama-cpp"


def row_cpu_like(backend: str, version: str = CURRENT) -> Row:
    row = Row(backend)
    rc, doc, err = build(version, backend)
    if doc is None:
        row.checked.append("build failed: " + _last_error(err))
        return row
    row.compiled, row.cold_build = f"yes (llama.cpp of llama-cpp-python {version})", cold_seconds(doc)
    cli = Path(doc["paths"]["llama-cli"])
    libs = needed(cli)
    if backend == "blas":
        row.checked.append("NEEDED " + ", ".join(n for n in libs if "blas" in n))
    with tempfile.TemporaryDirectory() as tmp:
        proc = generate(cli, tiny_model(Path(tmp), source_tree(version)))
    text = proc.stdout + proc.stderr
    if proc.returncode == 0:
        row.ran = "yes"
        row.checked.append("tiny model generated 16 tokens" + (f" ({_tps(text)})" if _tps(text) else ""))
    else:
        row.checked.append(f"run failed (exit {proc.returncode})")
    return row


def row_vulkan() -> Row:
    row = Row("vulkan")
    # the pinned current source must be refused before compiling (Debian 12 headers are too old)
    rc, doc, err = build(CURRENT, "vulkan", timeout=900)
    refusal = next((ln for ln in err.splitlines() if ln.startswith("error:")), "")
    if rc != 0 and "Vulkan headers" in refusal:
        row.checked.append(f"llama-cpp-python {CURRENT}'s llama.cpp refused before compiling: "
                           + refusal[len("error: "):][:160])
    else:
        row.checked.append(f"llama-cpp-python {CURRENT}'s llama.cpp was NOT refused (exit {rc})")
    rc, doc, err = build(VULKAN_SDIST, "vulkan")
    if doc is None:
        row.checked.append("build failed: " + _last_error(err))
        return row
    row.compiled, row.cold_build = f"yes (llama.cpp of llama-cpp-python {VULKAN_SDIST})", cold_seconds(doc)
    cli = Path(doc["paths"]["llama-cli"])
    with tempfile.TemporaryDirectory() as tmp:
        proc = generate(cli, tiny_model(Path(tmp), source_tree(VULKAN_SDIST)), "-ngl", "99")
    text = proc.stdout + proc.stderr
    device = re.search(r"ggml_vulkan: 0 = ([^|\n]+)", text)
    offload = re.search(r"offloaded (\d+)/(\d+) layers to GPU", text)
    if proc.returncode == 0 and device and offload:
        row.ran = "yes (lavapipe)"
        row.checked.append(f"`ggml_vulkan: 0 = {device.group(1).strip()}`, `{offload.group(0)}` (-ngl 99)"
                           + (f", {_tps(text)}" if _tps(text) else ""))
    else:
        row.checked.append(f"run failed (exit {proc.returncode}): device={bool(device)} offload={bool(offload)}")
    return row


def row_cuda() -> Row:
    row = Row("cuda")
    rc, doc, err = build(CURRENT, "cuda", "--cuda-arch", os.environ.get("CUDA_ARCH", "90"))
    if doc is None:
        row.checked.append("build failed: " + _last_error(err))
        return row
    row.compiled, row.cold_build = f"yes (nvcc 13.0, sm_{os.environ.get('CUDA_ARCH', '90')})", cold_seconds(doc)
    libs = needed(Path(doc["paths"]["llama-cli"]))
    row.checked.append("NEEDED " + ", ".join(n for n in libs if n.startswith(("libcu", "libcublas"))))
    row.ran = "no (no GPU here)"
    return row


def row_rocm() -> Row:
    row = Row("rocm")
    rc, doc, err = build(CURRENT, "rocm", timeout=900)
    refusal = next((ln for ln in err.splitlines() if ln.startswith("error:")), "")
    row.compiled = "no (refused: hipcc too old)" if "HIP" in refusal else f"no (exit {rc})"
    row.checked.append(refusal[len("error: "):][:200] or _last_error(err))
    return row


def row_llamafile_cuda() -> Row:
    """llamafile 0.8.4's ggml-cuda.so from the real source (shared/fixtures), --module-only."""
    row = Row("llamafile cuda module")
    work = Path(tempfile.mkdtemp(prefix="backends-llamafile-"))
    (work / "www").mkdir()
    os.symlink(FIXTURE, work / "www" / FIXTURE.name)
    arch = os.environ.get("CUDA_ARCH", "90")
    with serve_directory(work / "www") as base:
        entry = LockEntry("sources", "llamafile", f"{base}/{FIXTURE.name}", Hash.parse(PINNED), "nar", rev="0.8.4",
                          extra={"type": "github", "owner": "Mozilla-Ocho", "repo": "llamafile", "ref": "0.8.4",
                                 "submodules": False, "cosmocc": "3.3.6"})
        (work / "pylmserv.toml").write_text('[sources.llamafile]\ntype = "github"\nowner = "Mozilla-Ocho"\n'
                                            'repo = "llamafile"\nref = "0.8.4"\ncosmocc = "3.3.6"\n')
        Lock(path=work / "pylmserv.lock", sources={"llamafile": entry}).write()
        log("building llamafile 0.8.4 ggml-cuda.so --module-only")
        proc = subprocess.run([sys.executable, "-m", "pylmserv", "--config", str(work / "pylmserv.toml"), "--lock",
                               str(work / "pylmserv.lock"), "build", "llamafile", "--backend", "cuda", "--module-only",
                               "--cuda-arch", arch, "--json"], capture_output=True, text=True,
                              env=llama_source.build_env(), timeout=3600)
    if proc.returncode != 0:
        row.checked.append("build failed: " + _last_error(proc.stderr))
        return row
    doc = json.loads(proc.stdout)
    row.compiled, row.cold_build = f"yes (nvcc 13.0, sm_{arch}, tinyBLAS)", cold_seconds(doc)
    libs = needed(Path(doc["paths"]["ggml-cuda.so"]))
    row.checked.append("NEEDED " + ", ".join(n for n in libs if n.startswith("libcu"))
                       + "; every undefined cu* symbol provided by a NEEDED library (readelf/nm)")
    row.ran = "no (no GPU here)"
    return row


def _tps(text: str) -> str:
    m = re.search(r"eval time = .*?([\d.]+) tokens per second", text.split("prompt eval time")[-1]) \
        or re.search(r"Generation: ([\d.]+) t/s", text)
    return f"{float(m.group(1)):.1f} tokens/s" if m else ""


def _last_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return (lines[-1] if lines else (err.strip().splitlines() or ["?"])[-1])[:200]


ROWS: Dict[str, Callable[[], Row]] = {
    "cpu": lambda: row_cpu_like("cpu"),
    "blas": lambda: row_cpu_like("blas"),
    "vulkan": row_vulkan,
    "rocm": row_rocm,
    "cuda": row_cuda,
    "llamafile-cuda": row_llamafile_cuda,
}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    rows = []
    for name in args.only.split(","):
        t0 = time.monotonic()
        row = ROWS[name.strip()]()
        log(f"{name}: {row.compiled}; ran: {row.ran} ({time.monotonic() - t0:.0f} s this run)")
        rows.append(row)
    table = ["| backend | compiled here | ran here | cold build time on 2 cores | what was checked |",
             "|---|---|---|---|---|"] + [r.markdown() for r in rows]
    print("\n".join(table))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")
    return 0 if all(r.compiled.startswith("yes") or r.backend == "rocm" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
