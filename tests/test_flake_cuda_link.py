"""llamafile-cuda's link line, exercised with the real nvcc (CUDA 13 on this machine).

The real ggml-cuda.cu of llamafile 0.8.4 (../shared/fixtures) calls the CUDA driver API
(cuDeviceGet, cuMemCreate, ...): a ggml-cuda.so linked without libcuda leaves those
symbols to whatever the process happens to have loaded. Compiling the whole ggml-cuda.cu
takes many minutes, so a probe that calls exactly the driver functions ggml-cuda.cu calls
is compiled and linked with the flags nix/llamafile.nix gives nvcc (evaluated against the
nixpkgs stand-in), the driver stub directory swapped for a local stub libcuda.so with
nixpkgs' layout and soname (this machine has no driver stub). Then `readelf -d` must
list libcuda.so.1 as NEEDED and `nm -D --undefined-only` must leave no cu* symbol that
no NEEDED library defines. A probe linked without the flake's link flags fails the same
check, so the check can fail.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.support import flakeworld as fw
from tests.support.tools import missing, require  # noqa: F401

pytestmark = pytest.mark.nix

LLAMAFILE_FIXTURE = fw.REPO.parent / "shared" / "fixtures" / "llamafile-0.8.4.tar.gz"


def _driver_calls() -> list:
    if not LLAMAFILE_FIXTURE.is_file():
        missing(f"llamafile fixture ({LLAMAFILE_FIXTURE})", "../shared/fixtures beside the checkout")
    with tarfile.open(LLAMAFILE_FIXTURE) as tar:
        src = tar.extractfile("llamafile-0.8.4/llama.cpp/ggml-cuda.cu").read().decode()
    return sorted(set(re.findall(r"\b(cu[A-Z][A-Za-z0-9]*)\s*\(", src)))


def _run(*args, cwd=None):
    proc = subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def unresolved_driver_symbols(dso: Path, search: list) -> list:
    """cu* symbols `dso` needs that none of its NEEDED libraries (looked up in `search`) defines."""
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run("readelf", "-d", str(dso)))
    undefined = {l.split()[-1] for l in _run("nm", "-D", "--undefined-only", str(dso)).splitlines() if l.strip()}
    wanted = {s for s in undefined if re.fullmatch(r"cu[A-Z]\w*", s)}
    defined = set()
    for lib in needed:
        for d in search:
            if (Path(d) / lib).exists():
                defined |= {l.split()[-1] for l in _run("nm", "-D", "--defined-only", str(Path(d) / lib)).splitlines()
                            if l.strip()}
    return sorted(wanted - defined)


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    from tests.support.nixenv import have_nix, nix_env

    require(have_nix(), "real Nix", "apt-get install nix-bin; scripts/setup-dev.sh installs it")
    patch = pytest.MonkeyPatch()
    for key, value in nix_env().items():
        patch.setenv(key, value)
    flake = fw.copy_flake(tmp_path_factory.mktemp("cudalink") / "flake")
    shutil.copy2(fw.REPO / "pylmserv.lock", flake / "pylmserv.lock")
    proc = fw.nix("nix", "eval", "--json", *fw.override_nixpkgs(), f"path:{flake}#packages.x86_64-linux.llamafile-cuda",
                  "--apply", 'p: let q = p.override { cudaCapabilities = [ "8.9" ]; }; in '
                             '{ inherit (q) nvccFlags linkFlags stripStubsFromRunpath postBuild postInstall; }')
    assert proc.returncode == 0, proc.stderr
    patch.undo()
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if not shutil.which("nvcc"):
        pytest.skip("nvcc not on PATH")
    calls = _driver_calls()
    assert {"cuDeviceGet", "cuMemCreate", "cuMemMap"} <= set(calls), calls
    work = tmp_path_factory.mktemp("probe")
    # nixpkgs' stub: <cuda_cudart.stubs>/lib/stubs/libcuda.so with soname libcuda.so.1.
    stubs = work / "stubs" / "lib" / "stubs"
    stubs.mkdir(parents=True)
    (work / "stub.c").write_text("".join(f"int {c}(void) {{ return 0; }}\n" for c in calls))
    _run("gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stubs / "libcuda.so"), str(work / "stub.c"))
    (stubs / "libcuda.so.1").symlink_to("libcuda.so")  # what the loader resolves NEEDED against
    decls = "".join(f'extern "C" int {c}(...);\n' for c in calls)
    body = " + ".join(f"{c}()" for c in calls)
    (work / "ggml-cuda.cu").write_text(decls + f'extern "C" int probe(void) {{ return {body}; }}\n')
    return work, stubs, calls


def test_llamafile_cuda_ggml_cuda_so_needs_libcuda(flags, probe):
    work, stubs, calls = probe
    link = flags["linkFlags"]
    assert len(link) == 2 and link[0].startswith("-L") and link[0].endswith("/lib/stubs") and link[1] == "-lcuda"
    local_link = [f"-L{stubs}", "-lcuda"]  # the same flags, this machine's stub directory
    _run("nvcc", *flags["nvccFlags"], "-o", "ggml-cuda.so", "ggml-cuda.cu", *local_link, cwd=work)
    dso = work / "ggml-cuda.so"
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run("readelf", "-d", str(dso)))
    assert "libcuda.so.1" in needed, needed
    assert unresolved_driver_symbols(dso, [str(stubs)]) == []
    # The rpath for NixOS' driver directory is in the DSO itself (it is never patched).
    assert "/run/opengl-driver/lib" in _run("readelf", "-d", str(dso))


def test_without_the_link_flags_driver_symbols_are_unresolved(flags, probe):
    """What the flake built before: same nvcc flags, no -lcuda."""
    work, stubs, calls = probe
    _run("nvcc", *flags["nvccFlags"], "-o", "unlinked.so", "ggml-cuda.cu", cwd=work)
    missing = unresolved_driver_symbols(work / "unlinked.so", [str(stubs)])
    assert set(missing) == set(calls)


def runpath(dso: Path) -> list:
    m = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[([^\]]*)\]", _run("readelf", "-d", str(dso)))
    return m.group(1).split(":") if m else []


def test_the_zipped_module_has_no_stub_directory_in_its_runpath(flags, probe, tmp_path):
    """nixpkgs' ld-wrapper adds `-rpath DIR` for every store -L directory that supplies a
    library: here the stub directory. The flake strips it (postBuild, before postInstall
    zips the module into the llamafile, where no fixup reaches it); the copy read back out
    of the zip has the driver directory and no stub path."""
    require(shutil.which("patchelf"), "patchelf", "apt-get install patchelf; scripts/setup-dev.sh installs it")
    work, stubs, calls = probe
    assert "stripStubsFromRunpath cuda-build/ggml-cuda.so" in flags["postBuild"]
    assert flags["postBuild"].index("nvcc ") < flags["postBuild"].index("stripStubsFromRunpath cuda-build")
    assert "zipalign" in flags["postInstall"] and "stripStubs" not in flags["postInstall"]
    wrapper_rpath = f"--linker-options=-rpath,{stubs}"  # what ld-wrapper adds for -L<stubs> -lcuda
    _run("nvcc", *flags["nvccFlags"], wrapper_rpath, "-o", "ggml-cuda.so", "ggml-cuda.cu",
         f"-L{stubs}", "-lcuda", cwd=work)
    dso = work / "ggml-cuda.so"
    assert str(stubs) in runpath(dso)  # the problem, as a Nix build would have it
    _run("bash", "-c", flags["stripStubsFromRunpath"] + '\nstripStubsFromRunpath "$1"', "strip", str(dso))
    # what postInstall does (zipalign -j0: stored, top of the zip), then the copy read back
    _run("zip", "-0", "-j", str(tmp_path / "llamafile.zip"), str(dso))
    _run("unzip", "-q", str(tmp_path / "llamafile.zip"), "-d", str(tmp_path / "out"))
    zipped = runpath(tmp_path / "out" / "ggml-cuda.so")
    assert zipped and not [e for e in zipped if "stubs" in e], zipped
    assert zipped[0] == "/run/opengl-driver/lib" and zipped.count("/run/opengl-driver/lib") == 1
    assert "libcuda.so.1" in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]",
                                        _run("readelf", "-d", str(tmp_path / "out" / "ggml-cuda.so")))


def test_stripping_keeps_other_entries_in_order(flags, tmp_path):
    require(shutil.which("patchelf"), "patchelf", "apt-get install patchelf; scripts/setup-dev.sh installs it")
    (tmp_path / "x.c").write_text("int x(void) { return 1; }\n")
    dso = tmp_path / "x.so"
    entries = ["/nix/store/aaa-cuda_cudart-13.0-stubs/lib", "/nix/store/bbb-libcublas-13.0/lib",
               "/nix/store/ccc-cuda_cudart-13.0/lib/stubs", "/run/opengl-driver/lib", "/nix/store/ddd-glibc/lib"]
    _run("gcc", "-shared", "-fPIC", f"-Wl,-rpath,{':'.join(entries)}", "-o", str(dso), str(tmp_path / "x.c"))
    _run("bash", "-c", flags["stripStubsFromRunpath"] + '\nstripStubsFromRunpath "$1"', "strip", str(dso))
    assert runpath(dso) == ["/run/opengl-driver/lib", "/nix/store/bbb-libcublas-13.0/lib", "/nix/store/ddd-glibc/lib"]
