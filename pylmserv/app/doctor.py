"""`pylmserv doctor`: explain this machine before a build or a download fails on it.

Every probe reads the machine through a `Machine` value (PATH, environment, the
binfmt_misc directory, the store root, the disk-usage function, the OS name), so tests
fabricate machines instead of patching globals. Tool detection that builds also need
comes from the builders: cmake, compilers and GPU vendors from builders/toolchain.py, each
backend's toolkit and GPU lines from its module in builders/backends/ (the same module the
build's preflight asks), binfmt_misc parsing from builders/binfmt.py. This module runs
the checks, judges what is not one backend's, and words the report.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence
from ..builders import binfmt, source_checks, stored_llama_source
from ..builders import toolchain as tc
from ..builders.backends import cuda, metal, rocm, vulkan
from ..builders.probe import FAIL, OK, WARN, Check, version_str
from ..builders.llama_cpp import preflight
from ..core.errors import PylmservError, ToolMissingError
from ..core.fsutil import human_size, tree_size
from ..core.proc import probe
from ..core.version import __version__
from ..pins.config import load_project
from ..store import layout as paths
from ..store.integrity import last_verified
from ..pins.drift import config_drift
from .gc import estimate

GiB = 1 << 30
# Below this much free space the store cannot take even a small model plus a build.
DEFAULT_MIN_FREE = 5 * GiB
MIN_FREE_ENV = "PYLMSERV_DOCTOR_MIN_FREE"  # bytes; lets users (and tests) raise the bar


@dataclass(frozen=True)
class Machine:
    """What the probes look at. Defaults describe the real machine."""

    environ: Mapping[str, str]
    binfmt_dir: Path = Path("/proc/sys/fs/binfmt_misc")
    store_root: Optional[Path] = None
    system: str = field(default_factory=platform.system)
    disk_usage: Callable[[str], object] = shutil.disk_usage
    sysfs_drm: Path = Path("/sys/class/drm")  # PCI display devices (GPU vendor fallback)
    timeout: float = 20.0

    @classmethod
    def current(cls, **overrides) -> "Machine":
        environ = dict(os.environ)
        if environ.get("PYLMSERV_BINFMT_DIR"):  # read binfmt_misc elsewhere (tests, containers)
            overrides.setdefault("binfmt_dir", Path(environ["PYLMSERV_BINFMT_DIR"]))
        return cls(environ=environ, **overrides)

    @property
    def path(self) -> str:
        return self.environ.get("PATH", os.defpath)

    def which(self, name: str) -> Optional[str]:
        return shutil.which(name, path=self.path)

    def run(self, argv: Sequence[str]) -> Optional[subprocess.CompletedProcess]:
        """Run a probe command with this machine's environment; None if it cannot start."""
        return probe(argv, timeout=self.timeout, env=self.environ)

    def runner(self, argv: Sequence[str], timeout: float = 20.0):
        """The (argv, timeout) -> (returncode, output) form toolchain's detectors take."""
        proc = self.run(argv)
        if proc is None:
            return 127, f"cannot run {argv[0]}"
        return proc.returncode, (proc.stdout or "") + (proc.stderr or "")

    @property
    def sys_platform(self) -> str:
        return {"Darwin": "darwin", "Windows": "win32"}.get(self.system, self.system.lower())

    @property
    def min_free(self) -> int:
        value = self.environ.get(MIN_FREE_ENV, "")
        return int(value) if value.strip().isdigit() else DEFAULT_MIN_FREE


@dataclass(frozen=True)
class Report:
    checks: List[Check]

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def to_dict(self) -> dict:
        return {"checks": [c.to_dict() for c in self.checks]}


def diagnose(machine: Optional[Machine] = None, config: Optional[Path] = None, lock: Optional[Path] = None,
             backend: Optional[str] = None) -> Report:
    """Run every check. `backend` is what the user means to build (mismatches are named)."""
    machine = machine or Machine.current()
    groups = [
        ("python", lambda: [check_python(), check_pylmserv()]),
        ("build-tools", lambda: check_build_tools(machine)),
        ("git", lambda: [tool_presence(machine, "git", "git sources (`type = \"git\"`) need it",
                                       "Install git (apt-get install git).")]),
        ("unzip", lambda: [tool_presence(machine, "unzip", "upstream llamafile Makefiles unzip cosmocc with it",
                                         "Install unzip (apt-get install unzip).", version_args=("-v",))]),
        ("curl", lambda: [tool_presence(machine, "curl", "upstream scripts use it; pylmserv downloads by itself",
                                        "Install curl (apt-get install curl).")]),
        ("nix", lambda: check_nix(machine)),
        ("gpus", lambda: check_gpus(machine, backend, config, lock)),
        ("binfmt_misc", lambda: [check_binfmt(machine)]),
        ("store", lambda: check_store(machine)),
        ("store-verified", lambda: [check_verified(machine)]),
        ("gc", lambda: [check_gc(machine)]),
        ("lock", lambda: [check_lock(config, lock)]),
    ]
    checks: List[Check] = []
    for name, run_group in groups:
        try:
            checks += run_group()
        except Exception as exc:  # one broken probe must not hide the rest of the report
            checks.append(Check(name, WARN, f"check could not run: {type(exc).__name__}: {exc}",
                                "Please report this with `pylmserv -v doctor` output."))
    return Report(checks)


# -- versions ---------------------------------------------------------------------

def check_python() -> Check:
    v = sys.version_info
    text = f"Python {v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if v < (3, 9):
        return Check("python", FAIL, text, "pylmserv needs Python >= 3.9.")
    return Check("python", OK, text)


def check_pylmserv() -> Check:
    return Check("pylmserv", OK, f"pylmserv {__version__} ({Path(__file__).resolve().parent.parent})")


def _version_of(machine: Machine, exe: str, args=("--version",)) -> str:
    proc = machine.run([exe, *args])
    if proc is None:
        return ""
    text = (proc.stdout or "") + (proc.stderr or "")
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def tool_presence(machine: Machine, name: str, why: str, hint: str, missing: str = WARN,
                  version_args: Sequence[str] = ("--version",)) -> Check:
    exe = machine.which(name)
    if not exe:
        return Check(name, missing, f"not found on PATH ({why})", hint)
    version = _version_of(machine, exe, version_args)
    if len(version) > 60:  # curl lists every library it links; the first words say enough
        version = " ".join(version.split()[:2])
    return Check(name, OK, f"{exe}" + (f": {version}" if version else ""))


# -- build tools (cmake, ninja, compilers, ccache) ----------------------------------

def check_build_tools(machine: Machine) -> List[Check]:
    # Detection lives with the builder (builders/toolchain.py); doctor only judges.

    env, run = machine.environ, machine.runner
    checks = []
    cmake = tc.detect_cmake(env, run)
    need = version_str(tc.MIN_CMAKE)
    if not cmake.found:
        checks.append(Check("cmake", FAIL, "not found (llama.cpp builds with CMake only)",
                            "pip install cmake (the PyPI wheel is enough), or apt-get install cmake."))
    elif not cmake.version or cmake.version < tc.MIN_CMAKE:
        checks.append(Check("cmake", FAIL, f"{cmake.describe()}: older than {need}",
                            f"llama.cpp (with CUDA) needs CMake >= {need}: pip install -U cmake."))
    else:
        checks.append(Check("cmake", OK, f"{cmake.describe()} (>= {need} needed)"))
    ninja = tc.detect_ninja(env, run)
    checks.append(Check("ninja", OK, ninja.describe()) if ninja.found else
                  Check("ninja", WARN, "not found; CMake falls back to make (slower no-op rebuilds)",
                        "pip install ninja, or apt-get install ninja-build."))
    cc, cxx = tc.detect_compilers(env, run)
    for label, tool, pkg in (("c-compiler", cc, "gcc"), ("c++-compiler", cxx, "g++")):
        if tool.found:
            checks.append(Check(label, OK, f"{tool.path}: {tool.detail}" if tool.detail else tool.describe()))
        else:
            where = f"${'CC' if label == 'c-compiler' else 'CXX'} names {tool.name}, not found" \
                if tool.origin == "env" else "none of cc/gcc/clang found" if label == "c-compiler" \
                else "none of c++/g++/clang++ found"
            checks.append(Check(label, FAIL, where, f"Install a compiler: apt-get install {pkg} "
                                "(macOS: xcode-select --install)."))
    ccache = tc.detect_ccache(env, run)
    checks.append(Check("ccache", OK, ccache.describe()) if ccache.found else
                  Check("ccache", WARN, "not found; rebuilds after a change recompile everything",
                        "apt-get install ccache (brew install ccache): pylmserv uses it automatically."))
    return checks


# -- Nix --------------------------------------------------------------------------

def check_nix(machine: Machine) -> List[Check]:
    nix = machine.which("nix")
    hint = "Optional: install Nix (https://nixos.org/download, or apt-get install nix-bin) to use flake.nix."
    if not nix:
        return [Check("nix", WARN, "not found (only needed for `nix build` / `nix develop`)", hint)]
    version = _version_of(machine, nix)
    checks = [Check("nix", OK, f"{nix}: {version}")]
    features = _nix_features(machine, nix)
    if features is None:
        checks.append(Check("nix-flakes", WARN, "could not read `nix show-config`",
                            "Run `nix show-config` to see why; flakes need experimental-features = nix-command flakes."))
    elif {"flakes", "nix-command"} <= features:
        checks.append(Check("nix-flakes", OK, "experimental-features includes nix-command flakes"))
    else:
        checks.append(Check("nix-flakes", WARN, "flakes are not enabled (experimental-features = "
                            + (" ".join(sorted(features)) or "none") + ")",
                            "Add `experimental-features = nix-command flakes` to ~/.config/nix/nix.conf "
                            "(or export NIX_CONFIG with it)."))
    npg = machine.which("nix-prefetch-git")
    if npg:
        checks.append(Check("nix-prefetch-git", OK, npg))
    else:
        checks.append(Check("nix-prefetch-git", WARN,
                            "not found; pylmserv does not need it (it hashes git checkouts itself)",
                            "Optional, to cross-check git pins by hand: `nix profile install nixpkgs#nix-prefetch-git`."))
    return checks


def _nix_features(machine: Machine, nix: str) -> Optional[set]:
    """The enabled experimental features, or None when Nix cannot say."""
    # `nix show-config` (Nix <= 2.19) and `nix config show` (newer). The `nix` command itself
    # needs nix-command: when the plain call fails, ask again with it added and leave it out.
    for extra in ([], ["--extra-experimental-features", "nix-command"]):
        for args in (["show-config"], ["config", "show"]):
            proc = machine.run([nix, *extra, *args])
            if proc is not None and proc.returncode == 0:
                features = set()
                for line in proc.stdout.splitlines():
                    key, _, value = line.partition("=")
                    if key.strip() == "experimental-features":
                        features = set(value.split())
                return features - {"nix-command"} if extra else features
    return None


# -- GPUs and their toolchains -------------------------------------------------------

def check_gpus(machine: Machine, backend: Optional[str], config: Optional[Path] = None,
               lock: Optional[Path] = None) -> List[Check]:
    """One line per GPU vendor (each backend module words its own), then whether the
    toolkit for the GPU found, or for the backend asked for, is there and fits."""
    env, run = machine.environ, machine.runner
    nvidia_line, nvidia, driver_cuda = cuda.gpu_check(env, run)
    rocm_info = rocm.detect_rocm(env, run)
    vulkan_line, vk_devices = vulkan.gpu_check(env, run, requested=backend == "vulkan")
    checks = [nvidia_line, rocm.gpu_check(rocm_info), vulkan_line]
    if machine.system == "Darwin":
        checks.append(metal.gpu_check(env, run))
    vendors = tc.detect_gpu_vendors(env, run, machine.sysfs_drm, machine.sys_platform)
    checks += _toolchain_matches(machine, backend, nvidia, driver_cuda, rocm_info, vk_devices, vendors, config, lock)
    return checks


def _toolchain_matches(machine, backend, nvidia, driver_cuda, rocm_info, vk_devices, vendors, config=None,
                       lock=None) -> List[Check]:
    """Is the toolchain for the GPU (or for the requested backend) there, and does it fit?"""
    env, run = machine.environ, machine.runner
    checks: List[Check] = []
    have_nvidia = bool(nvidia) or "nvidia" in vendors
    have_amd = bool(rocm_info.gfx_targets) or "amd" in vendors
    want = backend

    # The seed's story: the backend asked for does not match the GPU that is there.
    # A GPU of the other vendor is a mistake (fail); no GPU at all may be a build host (warn).
    if want == "cuda" and not have_nvidia:
        found = "AMD GPU found" if have_amd else "no NVIDIA GPU found"
        alt = "--backend rocm (or vulkan)" if have_amd else "--backend cpu (or build here, run elsewhere)"
        checks.append(Check("backend", FAIL if have_amd else WARN, f"{found}; CUDA was requested",
                            f"CUDA runs only on NVIDIA GPUs: use {alt}."))
    elif want == "rocm" and not have_amd:
        found = "NVIDIA GPU found" if have_nvidia else "no AMD GPU found"
        alt = "--backend cuda (or vulkan)" if have_nvidia else "--backend cpu (or build here, run elsewhere)"
        checks.append(Check("backend", FAIL if have_nvidia else WARN, f"{found}; ROCm was requested",
                            f"ROCm runs only on AMD GPUs: use {alt}."))
    elif want == "metal" and machine.system != "Darwin":
        checks.append(Check("backend", FAIL, f"Metal was requested on {machine.system}",
                            "Metal exists only on macOS: use cuda, rocm, vulkan or cpu."))
    elif want:
        checks.append(Check("backend", OK, f"{want} requested; GPUs: {', '.join(vendors) or 'none'}"))

    if have_nvidia or want == "cuda":
        checks.append(cuda.toolkit_check(env, run, nvidia, driver_cuda, want == "cuda"))
    if have_amd or want == "rocm":
        checks.append(rocm.toolkit_check(rocm_info, run, have_amd, want == "rocm"))
    if vk_devices or want == "vulkan":
        checks.append(vulkan.toolkit_check(env, run, want == "vulkan"))
    if want in ("cuda", "rocm", "vulkan", "blas"):
        checks += _check_build_preflight(machine, want, config, lock)
    return checks


def _check_build_preflight(machine: Machine, backend: str, config: Optional[Path] = None,
                           lock: Optional[Path] = None) -> List[Check]:
    """The build's own preflight and source checks, so doctor and `pylmserv build` agree:
    the same detection, the same verdict, the same words."""
    toolchain = tc.detect_toolchain(backend, machine.environ, machine.runner, machine.sys_platform,
                                    machine.sysfs_drm)
    try:
        warnings = preflight(backend, toolchain, machine.sys_platform)
    except ToolMissingError as exc:
        return [Check("build-preflight", FAIL, exc.message, exc.hint or "")]
    source = stored_llama_source(config, lock)
    checked = f"the locked source in {source}" if source is not None else "current llama.cpp (source not fetched yet)"
    try:
        source_checks(backend, toolchain, source)
    except ToolMissingError as exc:
        return [Check("build-preflight", FAIL, exc.message, exc.hint or "")]
    detail = f"`pylmserv build --backend {backend}` would start (checked against {checked})"
    if warnings:
        return [Check("build-preflight", WARN, detail + "; " + "; ".join(warnings), "")]
    return [Check("build-preflight", OK, detail)]


# -- binfmt_misc ------------------------------------------------------------------------

def check_binfmt(machine: Machine) -> Check:
    """Will APE files (cosmocc's tools, llamafiles) run, or start WINE? (Linux only.)"""
    if machine.system != "Linux":
        return Check("binfmt_misc", OK, f"not used on {machine.system} (APE files run natively)")

    report = binfmt.read_binfmt(machine.binfmt_dir, loader_hint=_ape_loader_in_store(machine))
    if report.state == binfmt.APE_REGISTERED:
        return Check("binfmt_misc", OK, report.summary)
    if report.state == binfmt.MZ_HIJACKED:
        # pylmserv's own llamafile build runs APE tools through a shell/the loader, but a
        # llamafile started directly (./model.llamafile) would go to WINE: say how to fix it.
        return Check("binfmt_misc", WARN, report.summary + " (pylmserv's builds work around it; running "
                     "llamafiles directly does not)", "\n".join(report.fix))
    # No rule for APE: shells still run APE files as scripts and pylmserv starts them via sh.
    return Check("binfmt_misc", OK, report.summary, "\n".join(report.fix))


def _ape_loader_in_store(machine: Machine) -> Optional[str]:
    root = machine.store_root or paths.home(machine.environ)
    arch = platform.machine() or "x86_64"
    for cand in sorted(paths.toolchains_dir(root).glob(f"cosmocc-*/bin/ape-{arch}.elf"), reverse=True):
        return str(cand)
    return None


# -- store -----------------------------------------------------------------------------

def check_store(machine: Machine) -> List[Check]:
    root = machine.store_root or paths.home(machine.environ)
    # The store may not exist yet: measure the nearest existing parent's filesystem.
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = machine.disk_usage(str(probe))
    except OSError as exc:
        return [Check("store", FAIL, f"{root}: cannot read disk usage ({exc.strerror})",
                      "Set PYLMSERV_HOME to a writable directory.")]
    free = usage.free
    parts = []
    if root.exists():
        for name, where in (("blobs", paths.blobs_root(root)), ("builds", paths.builds_dir(root)),
                            ("toolchains", paths.toolchains_dir(root))):
            if where.exists():
                parts.append(f"{name} {human_size(tree_size(where))}")
    sizes = ", ".join(parts) if parts else "empty"
    detail = f"{root}: {human_size(free)} free of {human_size(usage.total)}; {sizes}"
    writable = os.access(probe, os.W_OK)
    if not writable:
        return [Check("store", FAIL, detail + " (not writable)", "Set PYLMSERV_HOME to a writable directory.")]
    need = machine.min_free
    if free < min(need, GiB):
        return [Check("store", FAIL, detail, f"Less than {human_size(min(need, GiB))} free: free disk space "
                      f"or point PYLMSERV_HOME at a larger disk.")]
    if free < need:
        return [Check("store", WARN, detail, f"Under {human_size(need)} free: models are GBs and a llama.cpp build "
                      f"is ~1 GiB; free space or set PYLMSERV_HOME to a larger disk.")]
    return [Check("store", OK, detail)]


def check_verified(machine: Machine) -> Check:
    """When `pylmserv verify` last re-hashed the store, and what it found."""
    root = machine.store_root or paths.home(machine.environ)
    last = last_verified(root) if root.is_dir() else None
    if last is None:
        return Check("store-verified", OK, "never (the store is trusted as written)",
                     "Run `pylmserv verify` now and then to detect disk rot.")
    detail = f"last at {last.get('checked_at')}: {last.get('checked')} entries checked, {last.get('bad')} bad"
    if last.get("bad"):
        return Check("store-verified", WARN, detail + " (moved aside)",
                     "Run `pylmserv fetch NAME` / `pylmserv build` to restore them from their pins.")
    return Check("store-verified", OK, detail)
def check_gc(machine: Machine) -> Check:
    """The store's size and what `pylmserv gc` would free (computed, nothing deleted)."""
    root = machine.store_root or paths.home(machine.environ)
    try:
        size, free, count = estimate(root)
    except PylmservError as exc:
        return Check("gc", WARN, f"cannot tell what gc would free: {exc.message}", exc.hint or "")
    detail = f"store {human_size(size)}; `pylmserv gc` would free {human_size(free)} ({count} item(s))"
    return Check("gc", OK, detail)


# -- lock ----------------------------------------------------------------------------------

def check_lock(config: Optional[Path], lock: Optional[Path]) -> Check:
    try:
        project = load_project(config, lock)
    except PylmservError as exc:
        return Check("lock", FAIL, exc.message, exc.hint or "Fix the file named above.")
    where = project.lock_path
    if where is None or not Path(where).exists():
        return Check("lock", FAIL, f"no lock at {where}", "Run `pylmserv prefetch` to create it.")
    problems, unpinned = lock_drift(project)
    n_locked = len(project.lock.sources) + len(project.lock.models)
    note = ""
    if unpinned:
        # Deliberately unpinned catalog entries (no published hash) are refused by fetch
        # unless --trust-on-first-use; worth saying, not worth a warning.
        note = "; unpinned (need --trust-on-first-use): " + ", ".join(unpinned)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        return Check("lock", WARN, f"{where}: {shown}{note}",
                     "Run `pylmserv prefetch` to pin what is missing (entries without a published hash need "
                     "--trust-on-first-use).")
    return Check("lock", OK, f"{where}: {n_locked} entries, in sync with {project.config_path}{note}")


def lock_drift(project) -> tuple:
    """(differences between what the config asks for and what the lock pins, unpinned models)."""
    problems, unpinned = [], []
    cfg, lock = project.config, project.lock
    for kind, label in (("sources", "source"), ("models", "model")):
        for name, spec in sorted(getattr(cfg, kind).items()):
            pin = getattr(lock, kind).get(name)
            if pin is None:
                if kind == "models":
                    unpinned.append(name)
                else:
                    problems.append(f"{label} {name} not locked")
                continue
            problems += [f"{label} {name}: {d}" for d in config_drift(spec, pin)]
        for name in sorted(set(getattr(lock, kind)) - set(getattr(cfg, kind))):
            problems.append(f"{label} {name} locked but not in the config")
    if lock.needs_upgrade:
        problems.append(f"lock version {lock.version} (read through the upgrade; `pylmserv prefetch` rewrites it)")
    return problems, unpinned
