"""llamafile's GPU module from the REAL llamafile 0.8.4 source (shared/fixtures), compiled by
the REAL nvcc of this machine: `pylmserv build llamafile --backend cuda --module-only`.

The source is served on 127.0.0.1 and pinned with its real NAR hash. nvcc compiles the
13k-line ggml-cuda.cu for one architecture (sm_90, about 70 s on 2 cores cold) and the
module is linked like upstream's llamafile/cuda.sh (`-lcuda`, tinyBLAS). The link line is
then checked with readelf/nm: every undefined cu* symbol must come from a NEEDED library.
No GPU can run the module here; compiling and linking are what these tests prove.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pylmserv.builders import cudalink
from pylmserv.builders.backends import cuda
from pylmserv.builders import toolchain as tc
from pylmserv.builders.cudalink import check_gpu_links as check_gpu_module_links
from pylmserv.builders.llamafile import write_driver_stub
from pylmserv.core.errors import BuildError
from pylmserv.core.hashing import Hash
from pylmserv.pins.config import Lock, LockEntry
from tests.conftest import run_cli
from tests.support.tools import missing, require  # noqa: F401

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "llamafile-0.8.4.tar.gz"
if not FIXTURE.is_file():
    FIXTURE = Path("/work/shared/fixtures/llamafile-0.8.4.tar.gz")
PINNED = "sha256-j7iPq1H3eB++aEMp2lbhMSO90t3DLFqgDQ4dseS9v7E="  # NAR hash of the unpacked tag 0.8.4
DRIVER_SYMBOLS = {"cuDeviceGet", "cuDeviceGetAttribute", "cuGetErrorString", "cuMemAddressFree",
                  "cuMemAddressReserve", "cuMemCreate", "cuMemGetAllocationGranularity", "cuMemMap",
                  "cuMemRelease", "cuMemSetAccess", "cuMemUnmap"}

needs_nvcc = pytest.mark.skipif(not cuda.detect_nvcc().found, reason="no nvcc on this machine")


@pytest.fixture
def binutils():
    require(shutil.which("readelf") and shutil.which("nm"), "binutils (readelf, nm)",
            "apt-get install binutils; scripts/setup-dev.sh installs it")



@pytest.fixture
def real_llamafile_lock(tmp_path, http_dir):
    """A lock pinning the real llamafile 0.8.4 tarball, served on loopback. No cosmocc pin:
    --module-only must not need one."""
    if not FIXTURE.is_file():
        missing(f"{FIXTURE}", "../shared/fixtures beside the checkout")
    www, base = http_dir
    shutil.copyfile(FIXTURE, www / FIXTURE.name)
    src = LockEntry("sources", "llamafile", f"{base}/{FIXTURE.name}", Hash.parse(PINNED), "nar", rev="0.8.4",
                    extra={"type": "github", "owner": "Mozilla-Ocho", "repo": "llamafile", "ref": "0.8.4",
                           "submodules": False, "cosmocc": "3.3.6"})
    cfg = tmp_path / "pylmserv.toml"
    cfg.write_text('[sources.llamafile]\ntype = "github"\nowner = "Mozilla-Ocho"\nrepo = "llamafile"\n'
                   'ref = "0.8.4"\ncosmocc = "3.3.6"\n')
    lock = Lock(path=tmp_path / "pylmserv.lock", sources={"llamafile": src})
    lock.write()
    return cfg, lock.path


def _run(argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@needs_nvcc
@pytest.mark.usefixtures("binutils")
def test_real_ggml_cuda_module_compiles_and_links_lcuda(tmp_path, home, real_llamafile_lock, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "userhome"))  # nvcc may write caches under HOME
    cfg, lock = real_llamafile_lock
    dry = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "--backend", "cuda", "--module-only",
                  "--cuda-arch", "90", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "-lcuda" in dry.stdout and "cosmocc" not in dry.stdout and "make" not in dry.stdout.split()
    proc = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "--backend", "cuda", "--module-only",
                   "--cuda-arch", "90", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    module = Path(doc["paths"]["ggml-cuda.so"])
    assert module.is_file() and module.read_bytes()[:4] == b"\x7fELF"
    # The link line: libcuda.so.1 is NEEDED, and it is what provides the driver symbols.
    needed = cudalink.elf_needed(module)
    assert "libcuda.so.1" in needed, needed
    undefined = {s for s in cudalink.elf_symbols(module, defined=False) if s.startswith("cu") and s[2:3].isupper()}
    assert DRIVER_SYMBOLS <= undefined  # what 0.8.4's ggml-cuda.cu calls (cuMemCreate & co: VMM pool)
    build_dir = Path(doc["build_dir"])
    stubs = cuda.find_cuda_stubs(cuda.detect_nvcc()) or build_dir / "gpu" / "stubs"
    missing, found = cudalink.unprovided_symbols(module, r"cu[A-Z]|cublas", [stubs])
    assert missing == [] and "libcuda.so.1" in found
    # tinyBLAS: no cuBLAS at run time; sm_90 code inside
    assert not any(n.startswith("libcublas") for n in needed)
    assert "sm_90" in _run(["cuobjdump", "--list-elf", str(module)]) if shutil.which("cuobjdump") else True
    # the same request again is the stamp fast path
    again = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "--backend", "cuda", "--module-only",
                    "--cuda-arch", "90", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["cache_hit"]


@pytest.mark.usefixtures("binutils")
def test_module_without_lcuda_is_refused_by_the_link_check(tmp_path):
    """The failure users hit: a module linked without -lcuda leaves driver symbols with no
    NEEDED library to provide them. Real cc, real readelf/nm, a small C module."""
    cc = tc.detect_compilers()[0].path
    require(cc, "a C compiler", "apt-get install gcc; scripts/setup-dev.sh installs it")
    src = tmp_path / "mod.c"
    src.write_text("int cuDeviceGet(int *d, int o);\nint cuMemCreate(void *h, unsigned long s, void *p, "
                   "unsigned long long f);\nint probe(void) { int d; return cuDeviceGet(&d, 0) + "
                   "cuMemCreate(0, 0, 0, 0); }\n")
    obj = tmp_path / "mod.o"
    subprocess.run([cc, "-c", "-fPIC", "-o", obj, src], check=True)
    bare = tmp_path / "bare.so"
    subprocess.run([cc, "-shared", "-o", bare, obj], check=True)
    with pytest.raises(BuildError, match=r"cuDeviceGet, cuMemCreate undefined"):
        check_gpu_module_links(bare, [])
    # with a stub generated from the object's own undefined symbols, linked with -lcuda
    stub = write_driver_stub(obj, tmp_path / "stubs" / "libcuda.so")
    assert cudalink.elf_soname(stub) == "libcuda.so.1"
    assert {"cuDeviceGet", "cuMemCreate"} <= set(cudalink.elf_symbols(stub, defined=True))
    linked = tmp_path / "linked.so"
    subprocess.run([cc, "-shared", "-o", linked, obj, f"-L{stub.parent}", "-lcuda"], check=True)
    assert "libcuda.so.1" in cudalink.elf_needed(linked)
    check_gpu_module_links(linked, [stub.parent])  # no error
    # a NEEDED libcuda that lacks one of the symbols is caught too
    partial_obj = tmp_path / "partial.o"
    (tmp_path / "partial.c").write_text("int cuDeviceGet(int *d, int o);\nint p(void){int d; return cuDeviceGet(&d,0);}\n")
    subprocess.run([cc, "-c", "-fPIC", "-o", partial_obj, tmp_path / "partial.c"], check=True)
    small = write_driver_stub(partial_obj, tmp_path / "small" / "libcuda.so")
    with pytest.raises(BuildError, match="cuMemCreate undefined"):
        check_gpu_module_links(linked, [small.parent])


def test_module_only_needs_a_gpu_backend(home, tmp_path, real_llamafile_lock):
    cfg, lock = real_llamafile_lock
    proc = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "--module-only")
    assert proc.returncode != 0 and "--module-only" in proc.stderr and "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1


@needs_nvcc
@pytest.mark.usefixtures("binutils")
def test_real_ggml_cuda_module_with_cublas_links_lcublas_too(tmp_path, home, real_llamafile_lock, monkeypatch):
    """--cuda-blas cublas: upstream's other link line (`-lcublas -lcuda`). cuBLAS comes from
    the toolkit or NVIDIA's PyPI wheel (scripts/backends-check.sh installs the wheel)."""
    cublas = cuda.detect_cublas(cuda.detect_nvcc())
    # setup-dev.sh installs NVIDIA's cuBLAS wheel for the CUDA version of the nvcc it finds
    require(cublas.found, "cuBLAS", "pip install 'nvidia-cublas==<nvcc's CUDA major.minor>.*'; "
                                    "scripts/setup-dev.sh installs it where nvcc is")
    monkeypatch.setenv("HOME", str(tmp_path / "userhome"))
    cfg, lock = real_llamafile_lock
    proc = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "--backend", "cuda", "--module-only",
                   "--cuda-arch", "90", "--cuda-blas", "cublas", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    module = Path(json.loads(proc.stdout)["paths"]["ggml-cuda.so"])
    needed = cudalink.elf_needed(module)
    assert "libcuda.so.1" in needed and any(n.startswith("libcublas.so") for n in needed), needed
    undefined = cudalink.elf_symbols(module, defined=False)
    assert any(s.startswith("cublas") for s in undefined)  # cuBLAS really used, not tinyBLAS
    build_dir = Path(json.loads(proc.stdout)["build_dir"])
    missing, found = cudalink.unprovided_symbols(module, r"cu[A-Z]|cublas", [build_dir / "gpu" / "stubs",
                                                                       Path(cublas.path).parent])
    assert missing == [] and any(k.startswith("libcublas") for k in found)
