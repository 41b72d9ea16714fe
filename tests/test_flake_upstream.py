"""The flake's llama.cpp derivation checked against llama.cpp's own build files.

The real llama.cpp tree is the one vendored in the llama-cpp-python sdist
(~/.cache/pylmserv-tests, see tests/support/llama_source.py); its CMake files and its
own .devops/nix/package.nix are read here. The derivation is evaluated against the
nixpkgs stand-in (nixpkgs' real lib; packages are stand-ins). Checked, per backend:
every `-D` option the flake passes exists at that commit and is not deprecated; every
REQUIRED find_package of a backend has a nixpkgs input; the version floors the CMake
files enforce (HIP, CMake) are the ones nix/llama-cpp.nix asserts; and upstream's
package.nix inputs are all in ours. And the CPU derivation's flags configure the real
tree with the real CMake (configure only).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Dict

import pytest

from tests.support import flakeworld as fw
from tests.support import llama_source
from tests.support.nixenv import have_nix, nix_env
from tests.support.tools import missing, require  # noqa: F401


# find_package name -> the nixpkgs inputs that provide it (None: the stdenv/CMake itself).
PROVIDERS = {
    "Vulkan": {"vulkan-headers", "vulkan-loader"},
    "Vulkan:glslc": {"shaderc"},
    "SPIRV-Headers": {"spirv-headers"},
    "hip": {"rocmPackages-clr"},
    "hipblas": {"rocmPackages-hipblas"},
    "rocblas": {"rocmPackages-rocblas"},
    "CUDAToolkit": {"cudaPackages-cuda_nvcc-12.8", "cudaPackages-cuda_cudart-12.8", "cudaPackages-libcublas-12.8"},
    "Threads": None,
    "Git": {"git"},
}
BACKEND_DIRS = {"vulkan": "ggml/src/ggml-vulkan", "rocm": "ggml/src/ggml-hip", "cuda": "ggml/src/ggml-cuda"}


@pytest.fixture(scope="module")
def vendored(tmp_path_factory) -> Path:
    """The CMake files and .devops/nix of the vendored llama.cpp."""
    if not llama_source.have_sdist():
        missing(f"llama-cpp-python sdist ({llama_source.SDIST})", "scripts/setup-dev.sh fetches it")
    dest = tmp_path_factory.mktemp("vendored")
    prefix = llama_source.VENDOR_PREFIX
    with tarfile.open(llama_source.SDIST) as tar:
        for m in tar:
            if not m.isfile() or not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix):]
            if rel.endswith(("CMakeLists.txt", ".cmake")) or rel.startswith(".devops/nix/"):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
    assert (dest / "CMakeLists.txt").is_file() and (dest / "ggml" / "CMakeLists.txt").is_file()
    return dest


@pytest.fixture(scope="module")
def derivations(tmp_path_factory):
    require(have_nix(), "real Nix", "apt-get install nix-bin; scripts/setup-dev.sh installs it")
    patch = pytest.MonkeyPatch()
    for key, value in nix_env().items():
        patch.setenv(key, value)
    flake = fw.copy_flake(tmp_path_factory.mktemp("up") / "flake")
    shutil.copy2(fw.REPO / "pylmserv.lock", flake / "pylmserv.lock")
    proc = fw.nix("nix", "eval", "--json", *fw.override_nixpkgs(), f"path:{flake}#packages", "--apply", r"""
      ps: let x = ps.x86_64-linux; names = l: map (i: i.name) l;
        info = p: { flags = p.cmakeFlags; inputs = names (p.nativeBuildInputs ++ p.buildInputs); inherit (p) floors; };
      in builtins.mapAttrs (_: info) {
        cpu = x.llama-cpp; cuda = x.llama-cpp-cuda; rocm = x.llama-cpp-rocm; vulkan = x.llama-cpp-vulkan;
        metal = ps.aarch64-darwin.llama-cpp;
      }""")
    assert proc.returncode == 0, proc.stderr
    yield flake, json.loads(proc.stdout)
    patch.undo()


def _cmake_text(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): p.read_text(errors="replace") for p in root.rglob("*") if p.is_file()
            and (p.name == "CMakeLists.txt" or p.suffix == ".cmake")}


def _option_names(flags):
    return {re.match(r"-D([A-Za-z0-9_]+):", f).group(1) for f in flags}


def _deprecated(everything: str):
    """Options llama.cpp marks deprecated: llama_option_depr(LEVEL OLD NEW) and
    message(DEPRECATION "OLD is deprecated ...")."""
    old = set(re.findall(r"llama_option_depr\(\s*\w+\s+(\w+)", everything))
    old |= set(re.findall(r"DEPRECATION\s+\"(\w+) is deprecated", everything))
    return old


@pytest.mark.nix
def test_every_cmake_option_the_flake_sets_exists_and_is_current(vendored, derivations):
    _, drvs = derivations
    everything = "\n".join(_cmake_text(vendored).values())
    deprecated = _deprecated(everything)
    names = set().union(*(_option_names(d["flags"]) for d in drvs.values()))
    assert {"GGML_BACKEND_DL", "GGML_CPU_ALL_VARIANTS", "LLAMA_BUILD_NUMBER", "LLAMA_BUILD_UI"} <= names
    for name in sorted(names):
        if name.startswith("CMAKE_"):
            continue  # CMake's own variables
        declared = re.search(rf"option\(\s*{name}\b|set\(\s*{name}\b[^)]*\bCACHE\b|DEFINED\s+{name}\b", everything)
        assert declared, f"-D{name}: no option/cache variable of that name in the vendored llama.cpp"
        assert name not in deprecated, f"-D{name} is deprecated at this commit"


def test_a_deprecated_option_would_be_caught(vendored):
    """The check above can fail: options the flake used to pass are reported."""
    deprecated = _deprecated("\n".join(_cmake_text(vendored).values()))
    assert {"LLAMA_CURL", "LLAMA_BUILD_WEBUI", "LLAMA_CUBLAS"} <= deprecated
    assert not {"GGML_CUDA", "LLAMA_BUILD_UI", "GGML_BACKEND_DL"} & deprecated


@pytest.mark.nix
@pytest.mark.parametrize("backend", sorted(BACKEND_DIRS))
def test_every_required_find_package_of_a_backend_has_an_input(vendored, derivations, backend):
    """Defect 2: at the vendored commit ggml-vulkan needs find_package(SPIRV-Headers)."""
    _, drvs = derivations
    text = (vendored / BACKEND_DIRS[backend] / "CMakeLists.txt").read_text()
    inputs = set(drvs[backend]["inputs"])
    # Unconditional find_package calls (column 0); indented ones sit in if-blocks of
    # optional features (NCCL, RCCL), off by default.
    found = re.findall(r"^find_package\(\s*([A-Za-z0-9_-]+)([^)]*)\)", text, re.M)
    assert found, f"no find_package in {BACKEND_DIRS[backend]}: the parser is broken"
    for name, args in found:
        components = re.search(r"COMPONENTS\s+([A-Za-z0-9_ ]+)", args)
        keys = [name] + [f"{name}:{c}" for c in (components.group(1).split() if components else [])
                         if c not in ("REQUIRED", "CONFIG", "QUIET", "MODULE")]
        for key in keys:
            assert key in PROVIDERS, f"{BACKEND_DIRS[backend]} requires {key}: add its nixpkgs input and a mapping here"
            if PROVIDERS[key]:
                missing = PROVIDERS[key] - inputs
                assert not missing, f"llama-cpp-{backend}: find_package({key}) needs {sorted(missing)}"


@pytest.mark.nix
def test_version_floors_are_the_vendored_ones(vendored, derivations):
    """Defect 3: ggml-hip refuses HIP < 6.1; nix/llama-cpp.nix asserts the same floor,
    and the CMake floor covers every cmake_minimum_required of the backends."""
    _, drvs = derivations
    hip = re.search(r"hip_VERSION\}?\s+VERSION_LESS\s+([0-9.]+)", (vendored / BACKEND_DIRS["rocm"] / "CMakeLists.txt").read_text())
    assert hip, "ggml-hip's HIP version check moved: update this test and nix/llama-cpp.nix"
    assert drvs["rocm"]["floors"]["hip"] == hip.group(1)

    def minimum(path):
        m = re.search(r"cmake_minimum_required\(\s*VERSION\s+(\d+(?:\.\d+)*)", path.read_text())
        return tuple(int(x) for x in m.group(1).split(".")) if m else (0,)

    top = minimum(vendored / "CMakeLists.txt")
    for backend, directory in BACKEND_DIRS.items():
        need = max(top, minimum(vendored / directory / "CMakeLists.txt"))
        have = tuple(int(x) for x in drvs[backend]["floors"]["cmake"].split("."))
        assert have >= need, f"llama-cpp-{backend}: asserts cmake >= {have}, the CMake files need {need}"


@pytest.mark.nix
def test_an_old_rocm_is_refused_at_evaluation(derivations):
    flake, _ = derivations
    proc = fw.nix("nix", "eval", "--raw", *fw.override_nixpkgs(), f"path:{flake}#packages.x86_64-linux.llama-cpp-rocm",
                  "--apply", 'p: (p.override (old: { rocmPackages = old.rocmPackages // '
                             '{ clr = old.rocmPackages.clr // { version = "6.0.2"; }; }; })).drvPath')
    assert proc.returncode != 0
    assert "this nixpkgs has ROCm (rocmPackages.clr) 6.0.2, llama.cpp b9941 needs >= 6.1" in proc.stderr, proc.stderr


@pytest.mark.nix
def test_upstream_package_nix_inputs_are_all_ours(vendored, derivations):
    """llama.cpp's own .devops/nix/package.nix at the vendored commit: each backend's
    input list is contained in ours (cccl is cuda_cccl in the stand-in's CUDA 12.8)."""
    _, drvs = derivations
    text = (vendored / ".devops" / "nix" / "package.nix").read_text()
    lists = {"vulkan": "vulkanBuildInputs", "rocm": "rocmBuildInputs", "cuda": "cudaBuildInputs"}
    prefix = {"vulkan": "", "rocm": "rocmPackages-", "cuda": "cudaPackages-"}
    for backend, var in lists.items():
        body = re.search(rf"{var}\s*=\s*(?:with [^;]+;\s*)?\[([^\]]*)\]", text)
        assert body, f"{var} not found in upstream package.nix"
        names = [n for n in re.findall(r"^\s*([A-Za-z0-9_-]+)", body.group(1), re.M)]
        assert names
        inputs = {re.sub(r"-12\.8$", "", i) for i in drvs[backend]["inputs"]}
        for n in names:
            ours = {"cccl": "cuda_cccl"}.get(n, n)
            assert prefix[backend] + ours in inputs, f"upstream's {var} has {n}; llama-cpp-{backend} lacks it"


@pytest.fixture(scope="module")
def vendored_tree(tmp_path_factory) -> Path:
    """The whole vendored llama.cpp tree (configure needs the sources, not only CMake files)."""
    if not llama_source.have_sdist():
        missing(f"llama-cpp-python sdist ({llama_source.SDIST})", "scripts/setup-dev.sh fetches it")
    dest = tmp_path_factory.mktemp("tree")
    prefix = llama_source.VENDOR_PREFIX
    with tarfile.open(llama_source.SDIST) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and (m.isfile() or m.isdir()):
                m.name = m.name[len(prefix):]
                members.append(m)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(dest, members=members)
    return dest


@pytest.mark.nix
def test_cpu_flags_configure_the_vendored_llama_cpp_with_real_cmake(vendored_tree, derivations, tmp_path):
    """The CPU+BLAS derivation's cmakeFlags given to the real CMake over the real
    vendored source (configure only; host compilers and OpenBLAS stand in for stdenv's):
    it configures, CMake uses every flag (an unknown one is listed under "Manually-
    specified variables were not used"; a deliberate probe shows the listing is read),
    every x86 CPU variant is added, and the generated build info carries the lock's
    build number and commit (what `llama-server --version` prints)."""
    cmake = shutil.which("cmake")
    require(cmake and shutil.which("ninja"), "cmake/ninja on PATH", "the [test] extra installs both")
    _, drvs = derivations
    flags = [re.sub(r"^(-DGGML_BACKEND_DIR:STRING=)/[a-z0-9]+/lib$", rf"\g<1>{tmp_path}/out/lib", f)
             for f in drvs["cpu"]["flags"]]
    assert any(f.startswith(f"-DGGML_BACKEND_DIR:STRING={tmp_path}") for f in flags)
    proc = subprocess.run([cmake, "-S", str(vendored_tree), "-B", str(tmp_path / "build"), "-G", "Ninja",
                           *flags, "-DPYLMSERV_PROBE_UNUSED=1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    unused = re.search(r"Manually-specified variables were not used by the project:\s*\n((?:\s+\S+\n)+)", out)
    assert unused and unused.group(1).split() == ["PYLMSERV_PROBE_UNUSED"], out[-3000:]
    variants = set(re.findall(r"Adding CPU backend variant (ggml-cpu-[a-z0-9_]+)", out))
    assert {"ggml-cpu-x64", "ggml-cpu-haswell", "ggml-cpu-skylakex"} <= variants, sorted(variants)
    info = (tmp_path / "build" / "common" / "build-info.cpp").read_text()
    number = next(f for f in flags if f.startswith("-DLLAMA_BUILD_NUMBER:")).split("=", 1)[1]
    commit = next(f for f in flags if f.startswith("-DLLAMA_BUILD_COMMIT:")).split("=", 1)[1]
    assert f"LLAMA_BUILD_NUMBER = {number};" in info and f'LLAMA_COMMIT = "{commit}";' in info
