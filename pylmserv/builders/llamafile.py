"""Build llamafile from the locked source with the locked cosmocc, GPU modules ahead of time.

Pipeline (each step named in --dry-run output):
1. lock: `[sources.llamafile]` (a NAR-pinned tree; its `cosmocc` field names the cosmocc
   version) and the matching `[sources.cosmocc-X_Y_Z]` zip pin.
2. fast path: the build key (source hash, cosmocc hash, backend, GPU options) names a
   build dir; a matching stamp there means nothing to do.
3. cosmocc unpacked in the store (pylmserv.builders.cosmocc); the source copied into the
   build dir (the Makefile writes o/ beside the sources).
4. `.cosmocc/<version>` pre-seeded in that copy: upstream's Makefile has a rule that runs
   build/download-cosmocc.sh for that directory, and the script exits at once when the
   directory exists. The version is read from the tree's build/config.mk and must match
   the lock, so the download can never run.
5. cosmocc's own bin/make (GNU make built as an APE) runs `all`, then `install PREFIX=`.
   How APE files are started depends on binfmt_misc (pylmserv.builders.binfmt): only with
   an APE rule and no MZ rule (WINE, run-detectors) are they exec'd directly; otherwise
   make runs under cosmocc's APE loader and `.cosmocc/<version>` becomes a tree of links
   into the store whose APE tools are `#!/bin/sh` shims that exec the loader, so nothing
   make starts is ever handed to WINE. HOME and TMPDIR point into the build dir (the
   loader and APE shell prologues write there).
6. --backend cuda|rocm: ggml-cuda.so (nvcc) or ggml-rocm.so (hipcc) compiled ahead of
   time from the same sources llamafile would compile at run time (read from the tree's
   llamafile/cuda.c table), for an explicit architecture list, then embedded as an aligned
   STORED zip entry in the installed executables: llamafile loads /zip/ggml-cuda.so, so the
   user's machine compiles nothing.
7. stamp, install to the prefix (`current` link per backend for the default prefix).
"""
from __future__ import annotations

import json
import os
import platform as _platform
import re
import shlex
import stat
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..core.apezip import embed_files
from ..core.errors import BuildError, ConfigError, ToolMissingError, UsageError
from ..core.fsutil import copy_tree_no_follow, remove_no_follow, walk_no_follow
from ..core.log import get_logger
from ..pins.config import load_project
from ..store import layout as paths
from ..store.trees import ensure_source, store_path
from .backends import cuda, rocm
from .probe import default_run, version_str
from .toolchain import detect_ccache
from .base import BuildSkeleton, Compiled
from .binfmt import is_ape, read_binfmt
from .cosmocc import Cosmocc, ensure_cosmocc, find_entry, toolchain_dir
from .cudalink import check_gpu_links, elf_symbols_of_object, write_cuda_driver_stub
from .llama_cpp import run_logged
from .result import BuildResult

log = get_logger("pylmserv.build")

ENGINE = "llamafile"
SOURCE_NAME = "llamafile"
BACKENDS = ("cpu", "cuda", "rocm")
MAPPING_VERSION = 2  # bump when the commands below change meaning (invalidates stamps)
LOG_NAME = "pylmserv-build.log"
MAKE_TIMEOUT = 6 * 3600
GPU_TIMEOUT = 3 * 3600
SEED_MARKER = ".pylmserv-seed.json"
# Explicit architecture lists (no -arch=native: the DSO ships to other machines). For CUDA
# the default is the SMs of released GPU generations that this nvcc still supports
# (`nvcc --list-gpu-arch`: CUDA 13 dropped everything below sm_75).
PREFERRED_CUDA_ARCHS = ("60", "61", "70", "75", "80", "86", "89", "90", "100", "120")
DEFAULT_CUDA_ARCHS = ("60", "61", "70", "75", "80", "86", "89", "90")
DEFAULT_GFX_TARGETS = ("gfx906", "gfx908", "gfx90a", "gfx942", "gfx1030", "gfx1100", "gfx1101", "gfx1102")
# The flags upstream's llamafile/cuda.c and cuda.sh pass (minus -march=native).
GGML_GPU_DEFINES = ("-DNDEBUG", "-DGGML_BUILD=1", "-DGGML_SHARED=1", "-DGGML_MULTIPLATFORM",
                    "-DGGML_CUDA_DMMV_X=32", "-DGGML_CUDA_MMV_Y=1", "-DK_QUANTS_PER_ITERATION=2",
                    "-DGGML_CUDA_PEER_MAX_BATCH_SIZE=128")
EMBED_INTO = ("llamafile", "llamafiler")  # executables that load the GPU module from /zip/


def default_llamafile(root=None) -> Path:
    """The llamafile binary pylmserv installed most recently (any backend)."""
    base = paths.home() if root is None else Path(root)
    found = [p for p in paths.bin_dir(base).glob(f"{ENGINE}-*/current/llamafile") if p.is_file()]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    if not found:
        raise UsageError("no llamafile built by pylmserv was found",
                         hint="Run `pylmserv build llamafile` first, or pass --llamafile PATH.")
    return found[0]


@dataclass(frozen=True)
class Step:
    """One command of the plan: argv, where, with which extra environment."""

    argv: Tuple[str, ...]
    what: str
    env: Tuple[Tuple[str, str], ...] = ()
    timeout: float = MAKE_TIMEOUT

    def line(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        return (f"env {prefix} " if prefix else "") + shlex.join(self.argv)


@dataclass
class Plan:
    exec_mode: str  # direct | loader
    binfmt_summary: str
    seed: Path  # <src>/.cosmocc/<version>
    steps: List[Step] = field(default_factory=list)
    gpu: List[Step] = field(default_factory=list)  # compile (and link) of the GPU module
    gpu_dso: Optional[Path] = None
    gpu_sources: Tuple[Tuple[str, str], ...] = ()  # (path in tree, flat name)
    driver_stub: Optional[Path] = None  # libcuda.so to generate for linking (toolkit has no stubs/)
    link_dirs: Tuple[Path, ...] = ()  # where the module's NEEDED GPU libraries are at link time
    module_only: bool = False
    notes: List[str] = field(default_factory=list)

    def lines(self, cosmocc_root: Path) -> List[str]:
        if self.exec_mode == "direct":
            seed = f"ln -s {shlex.quote(str(cosmocc_root))} {shlex.quote(str(self.seed))}"
        else:
            seed = (f"# seed {self.seed}: links into {cosmocc_root}, APE tools as #!/bin/sh shims "
                    f"that exec the APE loader")
        out = [] if self.module_only else [seed] + [s.line() for s in self.steps]
        if self.gpu:
            count = f"{len(self.gpu_sources)} " if self.gpu_sources else ""
            out.append(f"# copy the {count}sources named in llamafile/cuda.c into {self.gpu_dso.parent}")
            out.append(self.gpu[0].line())
            if self.driver_stub is not None:
                out.append(f"# write {self.driver_stub} (SONAME libcuda.so.1) exporting the cu* driver symbols "
                           f"{self.gpu[0].argv[-1].rsplit('/', 1)[-1]} needs: this toolkit has no stubs/libcuda.so")
            out += [s.line() for s in self.gpu[1:]]
            out.append(f"# check {self.gpu_dso.name}: every undefined cu*/cublas* symbol is provided by a NEEDED library")
            if not self.module_only:
                out.append(f"# embed {self.gpu_dso.name} as an aligned STORED zip entry into: {', '.join(EMBED_INTO)}")
        return out


def build_llamafile(backend: str = "cpu", jobs: Optional[int] = None, prefix: Optional[Path] = None,
                    dry_run: bool = False, force: bool = False, config: Optional[Path] = None,
                    lock: Optional[Path] = None, source_dir: Optional[Path] = None,
                    cuda_arch: Optional[str] = None, gpu_targets: Optional[str] = None,
                    cuda_blas: str = "tinyblas", binfmt_dir: Optional[Path] = None, module_only: bool = False,
                    **ignored):
    """Build llamafile for `backend`; a no-op (cache_hit=True) when the stamp says it is done."""
    if backend not in BACKENDS:
        raise UsageError(f"llamafile has no backend {backend!r}", hint="Use --backend cpu, cuda or rocm.")
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if cuda_blas not in ("tinyblas", "cublas"):
        raise UsageError(f"unknown CUDA BLAS {cuda_blas!r}", hint="Use tinyblas (no cuBLAS needed at run time) or cublas.")
    if module_only and backend not in ("cuda", "rocm"):
        raise UsageError("--module-only builds the GPU module (ggml-cuda.so / ggml-rocm.so)",
                         hint="Use it with --backend cuda or --backend rocm.")
    for name in sorted(k for k, v in ignored.items() if v):
        log.debug("llamafile build: option %s does not apply; ignored", name)
    return LlamafileBuild(backend=backend, jobs=jobs, prefix=prefix, force=force, config=config, lock=lock,
                          source_dir=source_dir, cuda_arch=cuda_arch, gpu_targets=gpu_targets,
                          cuda_blas=cuda_blas, binfmt_dir=binfmt_dir, module_only=module_only).run(dry_run)


class LlamafileBuild(BuildSkeleton):
    """One llamafile build on the shared skeleton: prepare = preflight, fetch, cosmocc;
    compile = make + make install (APE exec mode from binfmt_misc), then the GPU module."""

    engine = ENGINE

    def __init__(self, backend, jobs, prefix, force, config, lock, source_dir, cuda_arch, gpu_targets,
                 cuda_blas, binfmt_dir, module_only=False):
        super().__init__(prefix, force, source_dir)
        self.backend, self.module_only = backend, module_only
        self.jobs = jobs or os.cpu_count() or 1
        self.cuda_archs = _split(cuda_arch) or (default_cuda_archs() if backend == "cuda" else ())
        self.gfx = _split(gpu_targets) or (DEFAULT_GFX_TARGETS if backend == "rocm" else ())
        self.cuda_blas = cuda_blas if backend == "cuda" else None
        env_dir = os.environ.get("PYLMSERV_BINFMT_DIR")
        self.binfmt_dir = Path(binfmt_dir) if binfmt_dir else (Path(env_dir) if env_dir else None)
        project = load_project(config, lock).use_as_gc_root()  # a build keeps its sources
        self.entry = None
        if self.source_dir is None:
            self.entry = project.lock.entry("sources", SOURCE_NAME)
            if self.entry is None:
                raise ConfigError(f"no [sources.{SOURCE_NAME}] in {project.lock_path}",
                                  hint=f"Run `pylmserv prefetch {SOURCE_NAME}`.")
            if self.entry.mode != "nar":
                raise ConfigError(f"[sources.{SOURCE_NAME}] in {project.lock_path} is mode {self.entry.mode!r}; "
                                  "a source tree needs mode = \"nar\"", hint=f"Run `pylmserv prefetch --refresh {SOURCE_NAME}`.")
            version = self.entry.get("cosmocc")
        else:
            if not (self.source_dir / "Makefile").is_file():
                raise UsageError(f"{self.source_dir}: no Makefile there", hint="Pass the top directory of a llamafile tree.")
            version = _configured_cosmocc(self.source_dir)
        self.cosmocc_version, self.cosmocc_entry = None, None
        if not module_only:  # the GPU module is nvcc/hipcc only: no cosmocc needed
            if not version:
                raise ConfigError(f"[sources.{SOURCE_NAME}] does not say which cosmocc builds it",
                                  hint="Add cosmocc = \"X.Y.Z\" to [sources.llamafile] in pylmserv.toml and run "
                                       "`pylmserv prefetch`.")
            self.cosmocc_version = str(version)
            self.cosmocc_entry = find_entry(project.lock, self.cosmocc_version)
        inputs = {
            "engine": ENGINE, "mapping": MAPPING_VERSION, "backend": backend,
            "source": self.entry.hash.sri if self.entry is not None else f"path:{self.source_dir}",
            "rev": self.entry.rev if self.entry is not None else None,
            "cosmocc": self.cosmocc_entry.hash.sri if self.cosmocc_entry else None,
            "cuda_archs": list(self.cuda_archs), "gfx": list(self.gfx),
            "cuda_blas": self.cuda_blas, "module_only": module_only, "platform": f"{sys.platform}-{_platform.machine()}",
        }
        # a module-only build has its own prefix (and `current`): it never stands in for a llamafile
        self._identify(f"{backend}-module" if module_only else backend, inputs)
        self.src = self.build_dir / "src"
        self.stage = self.build_dir / "stage"

    # -- planning --------------------------------------------------------------------------

    def _toolchain_root(self) -> Path:
        return toolchain_dir(self.cosmocc_entry, self.home)

    def _plan(self, cosmocc_root: Optional[Path], source: Path, force_loader: bool = False) -> Plan:
        if self.module_only:
            plan = Plan(exec_mode="none", binfmt_summary="", seed=self.src, module_only=True)
            self._plan_gpu(plan, source)
            return plan
        cc = Cosmocc(self.cosmocc_version, cosmocc_root, self.cosmocc_entry.hash)
        report = read_binfmt(self.binfmt_dir, loader_hint=str(cc.loader()))
        mode = "direct" if report.direct_exec_ok and not force_loader else "loader"
        plan = Plan(exec_mode=mode, binfmt_summary=report.summary, seed=self.src / ".cosmocc" / self.cosmocc_version)
        plan.notes.append(f"binfmt_misc: {report.summary}; APE tools run "
                          + ("directly" if mode == "direct" else f"through {cc.loader().name}"))
        if mode != "direct" and report.fix:
            plan.notes.append("to run APE files directly on this machine: " + " ; ".join(report.fix))
        launcher = [str(cc.make)] if mode == "direct" else [str(cc.loader()), str(cc.make)]
        env = (("HOME", str(self.build_dir / "home")), ("TMPDIR", str(self.build_dir / "tmp")))
        plan.steps.append(Step(tuple(launcher + ["-C", str(self.src), f"-j{self.jobs}"]), "make", env))
        plan.steps.append(Step(tuple(launcher + ["-C", str(self.src), "install", f"PREFIX={self.stage}"]),
                               "make install", env))
        if self.backend in ("cuda", "rocm"):
            self._plan_gpu(plan, source)
        return plan

    def _plan_gpu(self, plan: Plan, source: Path) -> None:
        """The GPU module as llamafile/cuda.c would build it on the user's machine, with an
        explicit architecture list. CUDA: compile, then link with upstream's libraries
        (`-lcuda`, plus `-lcublas` unless tinyBLAS): without -lcuda the module leaves the
        driver symbols (cuDeviceGet, cuMemCreate, ...) undefined and dlopen fails."""
        gpu_dir = self.build_dir / "gpu"
        table = source / "llamafile" / "cuda.c"
        plan.gpu_sources = tuple(_gpu_sources(table)) if table.is_file() else ()
        if not plan.gpu_sources:
            plan.notes.append(f"{table}: no /zip/ source table found; the GPU module cannot be compiled ahead of time")
        # The last table entry is the main .cu file (upstream: "must come last"); the others sit
        # beside it, so its quoted #includes resolve without a working directory.
        flat_main = str(gpu_dir / (plan.gpu_sources[-1][1] if plan.gpu_sources else "ggml-cuda.cu"))
        if self.backend == "cuda":
            nvcc = cuda.detect_nvcc()
            exe = nvcc.path or "nvcc"
            arch = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in self.cuda_archs]
            arch.append(f"-gencode=arch=compute_{self.cuda_archs[-1]},code=compute_{self.cuda_archs[-1]}")  # PTX for newer GPUs
            blas = ["-DGGML_USE_TINYBLAS"] if self.cuda_blas == "tinyblas" else ["-DGGML_USE_CUBLAS"]
            link_dirs: List[Path] = []
            libs: List[str] = []
            if self.cuda_blas == "cublas":
                cublas = cuda.detect_cublas(nvcc)
                if cublas.include:
                    blas.append(f"-I{cublas.include}")
                libs += cublas.link_args("cublas")
                if cublas.found:
                    link_dirs.append(Path(cublas.libdir))
            stubs = cuda.find_cuda_stubs(nvcc)
            if stubs is None:
                stubs = gpu_dir / "stubs"
                plan.driver_stub = stubs / "libcuda.so"
            link_dirs.insert(0, stubs)
            libs = [f"-L{stubs}", "-lcuda"] + libs
            obj = gpu_dir / (Path(flat_main).stem + ".o")
            dso = gpu_dir / "ggml-cuda.so"
            compile_ = [exe, "-c", *arch, "--forward-unknown-to-host-compiler", "--compiler-options", "-fPIC -O3",
                        *GGML_GPU_DEFINES, *blas, "-o", str(obj), flat_main]
            ccache = detect_ccache()
            if ccache.found and ccache.name == "ccache":
                compile_.insert(0, ccache.path)
            link = [exe, "--shared", "-o", str(dso), str(obj), *libs]
            plan.gpu = [Step(tuple(compile_), "nvcc", timeout=GPU_TIMEOUT),
                        Step(tuple(link), "nvcc link", timeout=GPU_TIMEOUT)]
            plan.link_dirs = tuple(link_dirs)
        else:
            exe = rocm.detect_rocm().hipcc.path or "hipcc"
            dso = gpu_dir / "ggml-rocm.so"
            argv = [exe, "-O3", "-fPIC", "-shared", f"--offload-arch={','.join(self.gfx)}", *GGML_GPU_DEFINES,
                    "-DGGML_USE_HIPBLAS", "-DGGML_USE_TINYBLAS", "-o", str(dso), flat_main]
            # Debian's hipcc picks the NVIDIA platform when it sees nvcc: this module is for AMD GPUs.
            plan.gpu = [Step(tuple(argv), "hipcc", env=(("HIP_PLATFORM", "amd"),), timeout=GPU_TIMEOUT)]
        plan.gpu_dso = dso

    def _preflight(self) -> None:
        if self.backend == "cuda" and not cuda.detect_nvcc().found:
            raise ToolMissingError("--backend cuda needs nvcc (the CUDA toolkit), which was not found on PATH, "
                                   "in $CUDA_PATH/bin or /usr/local/cuda/bin",
                                   hint="Install the CUDA toolkit (e.g. apt install nvidia-cuda-toolkit) or set CUDA_PATH; "
                                        "or build --backend cpu.")
        if self.backend == "cuda" and self.cuda_blas == "cublas":
            nvcc = cuda.detect_nvcc()
            if not cuda.detect_cublas(nvcc).found:
                raise ToolMissingError(f"--cuda-blas cublas needs cuBLAS, which is neither in the CUDA toolkit of "
                                       f"{nvcc.path} nor installed from PyPI",
                                       hint=f"pip install nvidia-cublas (CUDA {version_str(nvcc.version)}), install "
                                            "the toolkit's libcublas-dev, or use --cuda-blas tinyblas.")
        if self.backend == "rocm" and not rocm.detect_rocm().hipcc.found:
            raise ToolMissingError("--backend rocm needs hipcc (ROCm), which was not found on PATH",
                                   hint="Install ROCm (hipcc) and put /opt/rocm/bin on PATH; or build --backend cpu.")

    def dry_run(self):
        notes: List[str] = []
        try:
            self._preflight()
        except ToolMissingError as exc:
            notes.append(f"preflight would fail: {exc.message}")
        source = self._source_path()
        if not source.is_dir():
            notes.append(f"source not fetched yet (a dry run fetches nothing): would fetch {self.entry.url}")
        root = None
        detected: Tuple[str, ...] = ()
        if not self.module_only:
            root = self._toolchain_root()
            if not root.is_dir():
                notes.append(f"cosmocc {self.cosmocc_version} not unpacked yet: would fetch {self.cosmocc_entry.url}")
        plan = self._plan(root, source)
        notes += plan.notes
        if not self.module_only:
            detected = (f"cosmocc {self.cosmocc_version}: {root}", f"APE exec mode: {plan.exec_mode}")
        return BuildResult(ENGINE, self.backend, {}, self.build_dir, self.prefix_dir(), time.monotonic() - self.start,
                           False, self.key, source, tuple(plan.lines(root)), detected, tuple(notes), dry_run=True)

    def _source_path(self) -> Path:
        if self.source_dir is not None:
            return self.source_dir

        return store_path(self.entry, self.home)

    # -- building ------------------------------------------------------------------------------

    def prepare(self) -> Path:
        self._preflight()
        source = self.source_dir if self.source_dir is not None else ensure_source(self.entry, self.home)
        if self.module_only:
            return source
        expected = _configured_cosmocc(source)
        if expected and expected != self.cosmocc_version:
            raise ConfigError(f"the llamafile tree builds with cosmocc {expected} (build/config.mk), "
                              f"the lock says {self.cosmocc_version}",
                              hint="Set cosmocc = \"%s\" in [sources.llamafile] and run `pylmserv prefetch`." % expected)
        self.cc = ensure_cosmocc(self.cosmocc_entry, self.home)
        return source

    def compile(self, source: Path) -> Compiled:
        log_file = self.build_dir / LOG_NAME
        if self.module_only:  # --module-only: just ggml-cuda.so / ggml-rocm.so (nvcc or hipcc, no cosmocc)
            plan = self._plan(None, source)
            log_file.write_text(f"# pylmserv build llamafile --module-only ({self.backend}) "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            self._build_gpu(plan, source, log_file, {})
            return Compiled({plan.gpu_dso.name: plan.gpu_dso}, tuple(plan.notes), tuple(plan.lines(None)))
        cc = self.cc
        self._copy_source(source)
        plan = self._plan(cc.root, source)
        for note in plan.notes:
            log.info("%s", note)
        seed_cosmocc(plan.seed, cc, plan.exec_mode)
        log_file.write_text(f"# pylmserv build llamafile ({self.backend}) {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                            + "".join(f"# {n}\n" for n in plan.notes))
        for d in ("home", "tmp"):
            (self.build_dir / d).mkdir(exist_ok=True)
        if self.stage.exists():
            remove_no_follow(self.stage)
        try:
            self._run_steps(plan, log_file, run_logged)
        except ToolMissingError as exc:
            if plan.exec_mode != "direct":
                raise
            # binfmt_misc claimed an APE rule but the kernel would not run bin/make
            # (ENOEXEC, e.g. in a container): fall back to the loader.
            note = f"direct exec of {cc.make} failed ({exc.message}); using {cc.loader().name}"
            log.warning("note: %s", note)
            plan = self._plan(cc.root, source, force_loader=True)
            plan.notes.append(note)
            seed_cosmocc(plan.seed, cc, plan.exec_mode)
            self._run_steps(plan, log_file, run_logged)
        outputs = {p.name: p for p in sorted((self.stage / "bin").glob("*")) if p.is_file()}
        if "llamafile" not in outputs:
            raise BuildError(f"make install put no bin/llamafile under {self.stage}; log: {log_file}",
                             hint="Check the log: the Makefile's install target did not run as expected.")
        if plan.gpu:
            self._build_gpu(plan, source, log_file, outputs)
        return Compiled(outputs, tuple(plan.notes), tuple(plan.lines(cc.root)),
                        {"cosmocc": str(cc.root), "exec_mode": plan.exec_mode})

    def _run_steps(self, plan: Plan, log_file: Path, run_logged) -> None:
        for step in plan.steps:
            env = dict(os.environ)
            env.update(dict(step.env))
            log.info("llamafile: %s (-j%d, APE via %s)", step.what, self.jobs, plan.exec_mode)
            run_logged(step.argv, log_file, env, step.timeout, step.what)

    def _copy_source(self, source: Path) -> None:
        """A writable copy of the (read-only, shared) store tree; kept between runs so a
        failed build resumes where make stopped. A local tree (source_dir) can change under
        the same key, so it is copied afresh every time."""
        if (self.src / "Makefile").is_file() and self.source_dir is None:
            return
        tmp = self.build_dir / "src.tmp"
        if tmp.exists():
            remove_no_follow(tmp)
        # store trees are read-only; make writes o/ here (iterative: a tree of any depth)
        copy_tree_no_follow(source, tmp, skip_names=(".cosmocc",), writable=True)
        if self.src.exists():
            remove_no_follow(self.src)
        os.replace(tmp, self.src)

    def _build_gpu(self, plan: Plan, source: Path, log_file: Path, outputs: Dict[str, Path]) -> None:
        if not plan.gpu_sources:
            raise BuildError(f"{source / 'llamafile' / 'cuda.c'}: no list of GPU sources found; "
                             f"cannot compile {plan.gpu_dso.name} ahead of time",
                             hint="This llamafile version is not supported for --backend cuda/rocm; build --backend cpu.")
        gpu_dir = plan.gpu_dso.parent
        gpu_dir.mkdir(parents=True, exist_ok=True)
        for rel, flat in plan.gpu_sources:
            src = source / rel
            if not src.is_file():
                raise BuildError(f"GPU source {rel} (named in llamafile/cuda.c) is missing from {source}")
            shutil.copyfile(src, gpu_dir / flat)
        log.info("llamafile: compiling %s with %s for %s", plan.gpu_dso.name, plan.gpu[0].what,
                 ", ".join(self.cuda_archs or self.gfx))
        env = dict(os.environ)
        if "CCACHE_BASEDIR" not in env:
            env["CCACHE_BASEDIR"] = str(self.home)  # relative paths in the key: other build dirs hit too
        for i, step in enumerate(plan.gpu):
            if i == 1 and plan.driver_stub is not None:
                write_driver_stub(gpu_dir / Path(plan.gpu[0].argv[plan.gpu[0].argv.index("-o") + 1]).name,
                                  plan.driver_stub)
            run_logged(step.argv, log_file, {**env, **dict(step.env)}, step.timeout, step.what)
        if not plan.gpu_dso.is_file():
            raise BuildError(f"{plan.gpu[-1].what} produced no {plan.gpu_dso}; log: {log_file}")
        if self.backend == "cuda":
            check_gpu_links(plan.gpu_dso, plan.link_dirs)
        for name in EMBED_INTO:
            if name in outputs:
                embed_files(outputs[name], [(plan.gpu_dso.name, plan.gpu_dso)])
                log.info("llamafile: embedded %s into %s", plan.gpu_dso.name, name)

# -- seeding .cosmocc/<version> ----------------------------------------------------------------

def seed_cosmocc(seed: Path, cc, exec_mode: str) -> None:
    """Make `seed` (<src>/.cosmocc/<version>) the store's cosmocc, so the Makefile's download
    rule never runs: a symlink (direct mode) or a tree of links with loader shims for the
    APE tools (loader mode). Left alone when it already is what we want (make lists the
    directory as a prerequisite of every object: touching it would rebuild everything)."""
    want = {"mode": exec_mode, "cosmocc": str(cc.root), "loader": str(cc.loader())}
    marker = seed.parent / f"{seed.name}{SEED_MARKER}"
    if os.path.lexists(seed) and marker.is_file():
        try:
            if json.loads(marker.read_text()) == want and (exec_mode != "direct" or os.readlink(seed) == str(cc.root)):
                return
        except (OSError, ValueError):
            pass
    seed.parent.mkdir(parents=True, exist_ok=True)
    if seed.is_symlink() or seed.is_file():
        seed.unlink()
    elif seed.is_dir():
        remove_no_follow(seed)  # our own shim tree (never the store: that is reached only through links)
    if exec_mode == "direct":
        os.symlink(cc.root, seed)
    else:
        tmp = seed.with_name(seed.name + ".tmp")
        if os.path.lexists(tmp):
            remove_no_follow(tmp)
        _shim_tree(cc.root, tmp, str(cc.loader()), is_ape)
        os.replace(tmp, seed)
    marker.write_text(json.dumps(want, sort_keys=True) + "\n")


def _shim_tree(store: Path, dest: Path, loader: str, is_ape) -> int:
    """Mirror `store` at `dest`: directories without APE files become one symlink, other
    files symlinks, APE files `#!/bin/sh` shims that exec the loader on the store file."""
    apes = set()
    for dirpath, _dirs, files in walk_no_follow(store):  # iterative, no link followed
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                regular = stat.S_ISREG(os.lstat(p).st_mode)
            except OSError:
                continue
            if regular and os.access(p, os.X_OK) and is_ape(p):  # never opens a FIFO
                apes.add(p)
    has_ape = {str(store)}
    for p in apes:
        d = os.path.dirname(p)
        while d.startswith(str(store)) and d not in has_ape:
            has_ape.add(d)
            d = os.path.dirname(d)

    stack = [(Path(store), Path(dest))]  # a stack, not recursion: a tree of any depth
    while stack:
        src, out = stack.pop()
        out.mkdir(parents=True)
        for child in sorted(src.iterdir()):
            target = out / child.name
            if child.is_dir() and not child.is_symlink() and str(child) in has_ape:
                stack.append((child, target))
            elif str(child) in apes:
                # `ape - PROG ARGV0 ...` keeps argv[0] = this shim, so tools that find their
                # helpers relative to argv[0] (gcc -> libexec/.../cc1) find the shims too.
                target.write_text("#!/bin/sh\n# pylmserv: run this APE tool through cosmocc's loader, so binfmt_misc "
                                  "(WINE, run-detectors) never sees it\n"
                                  f"exec {shlex.quote(loader)} - {shlex.quote(str(child))} \"$0\" \"$@\"\n")
                os.chmod(target, 0o755)
            else:
                os.symlink(child, target)
    return len(apes)


# -- reading the tree ------------------------------------------------------------------------------

_COSMOCC_RE = re.compile(r"^\s*COSMOCC\s*[:?]?=\s*\.cosmocc/(\S+)\s*$", re.M)
_ZIP_SRC_RE = re.compile(r'\{\s*"/zip/([^"]+)"\s*,\s*"([^"/]+)"\s*\}')


def _configured_cosmocc(tree: Path) -> Optional[str]:
    """The cosmocc version the tree's Makefile expects in .cosmocc/ (build/config.mk)."""
    for rel in ("build/config.mk", "Makefile"):
        try:
            m = _COSMOCC_RE.search((tree / rel).read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
        if m:
            return m.group(1)
    return None


def _gpu_sources(cuda_c: Path) -> List[Tuple[str, str]]:
    """(path in the tree, flat name) of the GPU sources, from cuda.c's {"/zip/...", "name"}
    table: the same files llamafile extracts and compiles at run time."""
    text = cuda_c.read_text(encoding="utf-8", errors="replace")
    return [(m.group(1), m.group(2)) for m in _ZIP_SRC_RE.finditer(text)]


def default_cuda_archs(nvcc: Optional[str] = None, run=None) -> Tuple[str, ...]:
    """PREFERRED_CUDA_ARCHS that this nvcc can target, in order; DEFAULT_CUDA_ARCHS when
    nvcc is missing or does not answer --list-gpu-arch (CUDA < 11)."""
    exe = nvcc or cuda.detect_nvcc().path
    if not exe:
        return DEFAULT_CUDA_ARCHS
    supported = set(cuda.nvcc_arches(exe, run or default_run) or ())
    archs = tuple(a for a in PREFERRED_CUDA_ARCHS if a in supported)
    return archs or DEFAULT_CUDA_ARCHS


def _split(value: Optional[str]) -> Tuple[str, ...]:
    if not value:
        return ()
    return tuple(v.strip() for v in re.split(r"[;, ]+", value) if v.strip())


# -- the CUDA module's link line ------------------------------------------------------------------

_DRIVER_SYMBOL = re.compile(r"cu[A-Z][A-Za-z0-9_]*\Z")


def write_driver_stub(obj: Path, stub: Path, cc: Optional[str] = None) -> Path:
    """The link-time libcuda stub for `obj`: exactly the cu* driver symbols it leaves undefined."""
    names = sorted({s for s in elf_symbols_of_object(obj) if _DRIVER_SYMBOL.match(s)})
    return write_cuda_driver_stub(names, stub, cc)


