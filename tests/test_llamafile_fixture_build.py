"""`pylmserv build llamafile`, fixture-based: the cosmocc *fixture* zip (shell scripts in
place of cosmocc's tools, tests/support/cosmocc_fixture.py) and a llamafile-shaped
*fixture* tree (tests/support/llamafile_tree.py), both served on 127.0.0.1 and locked
with their real hashes, built with the real GNU make behind the fixture's bin/make.
The binfmt_misc directories are fabricated. Nothing here ran the real cosmocc."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from pylmserv.core.archive import extract
from pylmserv.builders.llamafile import build_llamafile, default_llamafile
from pylmserv.store.records import STAMP_NAME
from pylmserv.pins.config import Lock, LockEntry
from pylmserv.core.errors import BuildError, ConfigError, ToolMissingError
from pylmserv.core.hashing import file_hash
from pylmserv.core.nar import nar_hash
from tests.conftest import run_cli
from tests.support.cosmocc_fixture import build_cosmocc_zip
from tests.support.llamafile_tree import write_tarball, write_tree
from tests.test_binfmt import APE, PYTHON, WINE, fabricate

CONFIG = """\
[sources.llamafile]
type = "github"
owner = "Mozilla-Ocho"
repo = "llamafile"
ref = "0.8.4"
cosmocc = "3.3.6"

[sources.cosmocc-3_3_6]
type = "url"
url = "https://github.com/jart/cosmopolitan/releases/download/3.3.6/cosmocc-3.3.6.zip"
version = "3.3.6"
"""


@pytest.fixture
def project(tmp_path, http_dir, home, monkeypatch):
    """Write config + lock pinning the fixture tarball and fixture cosmocc on loopback."""
    monkeypatch.setenv("COSMOCC_FIXTURE_LOG", str(tmp_path / "tools.log"))

    def make(broken=False, tree_cosmocc="3.3.6", name="llamafile-0.8.4.tar.gz"):
        www, base = http_dir
        z = build_cosmocc_zip(www / "cosmocc-3.3.6.zip")
        tb = write_tarball(www / name, version=tree_cosmocc, broken=broken)
        tree = extract(tb, tmp_path / f"unpacked-{name}", policy="tar", strip_single_root=True)
        cosmo = LockEntry("sources", "cosmocc-3_3_6", f"{base}/cosmocc-3.3.6.zip", file_hash(z), "flat",
                          extra={"type": "url", "unpack": False, "version": "3.3.6"})
        src = LockEntry("sources", "llamafile", f"{base}/{name}", nar_hash(tree), "nar", rev="0.8.4",
                        extra={"type": "github", "owner": "Mozilla-Ocho", "repo": "llamafile", "ref": "0.8.4",
                               "submodules": False, "cosmocc": "3.3.6"})
        cfg = tmp_path / "pylmserv.toml"
        cfg.write_text(CONFIG)
        lock = Lock(path=tmp_path / "pylmserv.lock", sources={"llamafile": src, "cosmocc-3_3_6": cosmo})
        lock.write()
        return cfg, lock.path

    return make


def tool_log(tmp_path) -> list:
    p = tmp_path / "tools.log"
    return p.read_text().splitlines() if p.exists() else []


def test_llamafile_fixture_build_loader_mode_when_wine_owns_mz(tmp_path, project, home):
    cfg, lock = project()
    binfmt = fabricate(tmp_path, wine=WINE, **{"python3.11": PYTHON})
    result = build_llamafile(config=cfg, lock=lock, binfmt_dir=binfmt, jobs=2)

    assert not result.cache_hit
    assert set(result.binaries) == {"llamafile", "zipalign", "llamafiler"}
    assert result.prefix == home / "bin" / "llamafile-cpu" / result.key
    assert result.current == home / "bin" / "llamafile-cpu" / "current"
    assert any("wine (/usr/bin/wine)" in n and "through ape-" in n for n in result.notes)
    src = result.build_dir / "src"
    # pre-seeded: the Makefile's download rule never ran
    assert not (src / "DOWNLOAD_ATTEMPTED").exists()
    seed = src / ".cosmocc" / "3.3.6"
    store = next((home / "toolchains").glob("cosmocc-3.3.6-*/"))
    assert seed.is_dir() and not seed.is_symlink()
    # APE tools are shims that exec the loader; everything else links into the store
    make_shim = (seed / "bin" / "make").read_text()
    assert make_shim.startswith("#!/bin/sh\n") and f"{store}/bin/ape-" in make_shim and f"{store}/bin/make" in make_shim
    assert (seed / "bin" / "cosmocc").is_symlink() and os.readlink(seed / "bin" / "cosmocc") == str(store / "bin" / "cosmocc")
    assert (seed / "include").is_symlink()  # no APE inside: one link
    assert (seed / "libexec").is_dir() and not (seed / "libexec").is_symlink()  # has an APE (cc1) inside
    lines = tool_log(tmp_path)
    home_env, tmp_env = f"HOME={result.build_dir / 'home'}", f"TMPDIR={result.build_dir / 'tmp'}"
    assert lines[0].startswith(f"ape-loader {home_env} {tmp_env} {store}/bin/make -C {src} -j2")
    assert any(ln.startswith("zipobj ") for ln in lines)
    # zipobj went through its shim: the loader got `- <store>/bin/zipobj <the shim's own path>`
    assert any(ln.startswith("ape-loader ") and f" - {store}/bin/zipobj .cosmocc/3.3.6/bin/zipobj -a x86_64" in ln
               for ln in lines), lines
    assert any(ln.startswith("cosmoranlib ") for ln in lines)  # 0444 in the zip: ran because its bit was fixed
    # outputs: APE-shaped executables that are zips, installed and stamped
    llamafile = result.binaries["llamafile"]
    assert llamafile.read_bytes().startswith(b"MZqFpD='")
    with zipfile.ZipFile(llamafile) as z:
        assert z.read("version.txt") == b"fixture\n"
    assert os.access(llamafile, os.X_OK)
    stamp = json.loads((result.build_dir / STAMP_NAME).read_text())
    assert set(stamp["outputs"]) == {"llamafile", "zipalign", "llamafiler"} and stamp["extra"]["exec_mode"] == "loader"
    assert default_llamafile() == result.current / "llamafile"

    # second run: the stamp says done; no tool runs, same install
    before = tool_log(tmp_path)
    again = build_llamafile(config=cfg, lock=lock, binfmt_dir=binfmt, jobs=2)
    assert again.cache_hit and again.key == result.key and again.binaries == result.binaries
    assert tool_log(tmp_path) == before

    # the built llamafile is what `pylmserv pack` uses by default
    model = tmp_path / "m.gguf"
    from tests.test_pack import make_gguf

    make_gguf(model, 1000)
    out = tmp_path / "packed"
    proc = run_cli("pack", model, "-o", out)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(out) as z:
        assert z.read(".args") == b"-m\n/zip/m.gguf\n...\n" and "version.txt" in z.namelist()


def test_llamafile_fixture_direct_plan_when_ape_registered_falls_back_on_enoexec(tmp_path, project, home):
    cfg, lock = project()
    binfmt = fabricate(tmp_path, APE=APE)
    dry = build_llamafile(config=cfg, lock=lock, binfmt_dir=binfmt, jobs=1, dry_run=True)
    store_make = dry.detected[0].split(": ", 1)[1] + "/bin/make"  # "cosmocc 3.3.6: <store dir>"
    assert dry.dry_run and dry.commands[0].startswith("ln -s ")
    assert dry.commands[1].split()[3] == store_make  # env HOME=.. TMPDIR=.. <store>/bin/make: no loader
    assert tool_log(tmp_path) == [] and not dry.build_dir.exists()
    # This machine has no APE rule in its real binfmt_misc, so the kernel refuses (ENOEXEC);
    # the builder notices and uses the loader instead.
    result = build_llamafile(config=cfg, lock=lock, binfmt_dir=binfmt, jobs=1)
    assert "llamafile" in result.binaries
    assert any("direct exec of" in n and "using ape-" in n for n in result.notes)
    assert not (result.build_dir / "src" / "DOWNLOAD_ATTEMPTED").exists()


def test_llamafile_fixture_no_ape_rule_names_the_fix(tmp_path, project, home):
    cfg, lock = project()
    binfmt = fabricate(tmp_path, **{"python3.11": PYTHON})
    dry = build_llamafile(config=cfg, lock=lock, binfmt_dir=binfmt, dry_run=True)
    assert "ape-" in dry.commands[1] and dry.commands[0].startswith("# seed ")
    assert any("echo ':APE:M::MZqFpD::/usr/bin/ape:'" in n for n in dry.notes)
    assert any("cosmocc 3.3.6 not unpacked yet" in n for n in dry.notes)


def test_llamafile_fixture_makefile_would_download_without_seed(tmp_path):
    """Control: the fixture tree really runs its download step when .cosmocc/<ver> is
    missing, so the 'never downloads' assertions above can fail."""
    tree = write_tree(tmp_path / "t")
    proc = subprocess.run(["make", "-C", str(tree)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and (tree / "DOWNLOAD_ATTEMPTED").exists()
    assert "would download cosmocc-3.3.6.zip" in proc.stderr


def test_llamafile_fixture_build_failure_leaves_no_stamp_and_names_log(tmp_path, project, home):
    cfg, lock = project(broken=True)
    binfmt = fabricate(tmp_path, wine=WINE)
    with pytest.raises(BuildError) as info:
        build_llamafile(config=cfg, lock=lock, binfmt_dir=binfmt, jobs=1)
    msg = info.value.message
    assert "make failed" in msg and "pylmserv-build.log" in msg and "#error" in msg
    build_dir = next((home / "builds").glob("llamafile-cpu-*/"))
    assert not (build_dir / STAMP_NAME).exists()
    assert "#error in source" in (build_dir / "pylmserv-build.log").read_text()
    assert not (home / "bin" / "llamafile-cpu").exists()


def test_llamafile_fixture_cli_failure_is_one_clear_error(tmp_path, project, home):
    cfg, lock = project(broken=True)
    binfmt = fabricate(tmp_path, wine=WINE)
    proc = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "-j", "1",
                   env={"PYLMSERV_BINFMT_DIR": str(binfmt)})
    assert proc.returncode == 6
    assert proc.stderr.count("error: make failed") == 1 and "Traceback" not in proc.stderr


def test_llamafile_fixture_cosmocc_version_mismatch_stops_before_make(tmp_path, project, home):
    cfg, lock = project(tree_cosmocc="3.9.7")
    with pytest.raises(ConfigError, match=r"builds with cosmocc 3.9.7 .* lock says 3.3.6"):
        build_llamafile(config=cfg, lock=lock, binfmt_dir=fabricate(tmp_path, wine=WINE))
    assert tool_log(tmp_path) == []


def test_llamafile_fixture_cli_dry_run_prints_commands(tmp_path, project, home):
    cfg, lock = project()
    binfmt = fabricate(tmp_path, wine=WINE)
    proc = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "--dry-run", "-j", "3",
                   env={"PYLMSERV_BINFMT_DIR": str(binfmt)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].startswith("# seed ") and "ape-x86_64.elf" in out[1] or "ape-aarch64.elf" in out[1]
    assert out[1].endswith("-j3") and "install PREFIX=" in out[2]
    assert "wine" in proc.stderr
    assert not (home / "builds").exists() or not any((home / "builds").iterdir())


# -- GPU modules: stand-in nvcc/hipcc (no GPU machine or CUDA toolkit here) -------------

FAKE_NVCC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 12.4, V12.4.131"; exit 0; fi
printf '%s\\n' "$*" >> "$GPU_FIXTURE_LOG"
out=""; while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done
printf '\\177ELF fake ggml gpu module' > "$out"
"""


def fake_gpu_tool(tmp_path, name, monkeypatch) -> Path:
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text(FAKE_NVCC.replace("Cuda compilation tools, release 12.4, V12.4.131",
                                      "HIP version: 6.1.40091" if name == "hipcc" else
                                      "Cuda compilation tools, release 12.4, V12.4.131"))
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("GPU_FIXTURE_LOG", str(tmp_path / "gpu.log"))
    monkeypatch.setenv("CCACHE_DISABLE", "1")  # ccache would run the stand-in to preprocess too
    return tool


def aligned_entry(path: Path, name: str) -> bytes:
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
        assert info.compress_type == zipfile.ZIP_STORED
        off = info.header_offset
        start = off + 30 + int.from_bytes(blob[off + 26:off + 28], "little") + int.from_bytes(blob[off + 28:off + 30], "little")
        assert start % 65536 == 0
        assert z.read(name) == blob[start:start + info.file_size]
        return z.read(name)


def test_llamafile_fixture_cuda_module_built_ahead_and_embedded_mock_nvcc(tmp_path, project, home, monkeypatch):
    fake_gpu_tool(tmp_path, "nvcc", monkeypatch)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    cfg, lock = project()
    binfmt = fabricate(tmp_path, wine=WINE)
    result = build_llamafile(backend="cuda", config=cfg, lock=lock, binfmt_dir=binfmt, cuda_arch="75;86")
    compile_line, link_line = (tmp_path / "gpu.log").read_text().splitlines()
    argv, link = compile_line.split(), link_line.split()
    gpu_dir = result.build_dir / "gpu"
    assert "-gencode=arch=compute_75,code=sm_75" in argv and "-gencode=arch=compute_86,code=sm_86" in argv
    assert "-gencode=arch=compute_86,code=compute_86" in argv  # PTX for newer GPUs
    assert "-DGGML_USE_TINYBLAS" in argv and "-c" in argv and "-march=native" not in " ".join(argv)
    assert argv[argv.index("-o") + 1] == str(gpu_dir / "ggml-cuda.o") and argv[-1] == str(gpu_dir / "ggml-cuda.cu")
    # linked like upstream's cuda.sh: the driver library, no cuBLAS with tinyBLAS
    assert "--shared" in link and link[link.index("-o") + 1] == str(gpu_dir / "ggml-cuda.so")
    assert "-lcuda" in link and not any("cublas" in a for a in link)
    assert sorted(p.name for p in gpu_dir.iterdir()) == sorted(
        ["ggml.h", "tinyblas.h", "tinyblas.cu", "ggml-cuda.h", "ggml-cuda.cu", "ggml-cuda.o", "ggml-cuda.so",
         "stubs"])
    for name in ("llamafile", "llamafiler"):
        assert aligned_entry(result.binaries[name], "ggml-cuda.so") == b"\x7fELF fake ggml gpu module"
    assert "ggml-cuda.so" not in zipfile.ZipFile(result.binaries["zipalign"]).namelist()
    assert result.prefix.parent.name == "llamafile-cuda"
    assert build_llamafile(backend="cuda", config=cfg, lock=lock, binfmt_dir=binfmt, cuda_arch="75;86").cache_hit
    # another arch list is another build (key), not a stale hit
    assert build_llamafile(backend="cuda", config=cfg, lock=lock, binfmt_dir=binfmt, cuda_arch="89",
                           dry_run=True).key != result.key


def test_llamafile_fixture_rocm_module_mock_hipcc(tmp_path, project, home, monkeypatch):
    fake_gpu_tool(tmp_path, "hipcc", monkeypatch)
    cfg, lock = project()
    result = build_llamafile(backend="rocm", config=cfg, lock=lock, binfmt_dir=fabricate(tmp_path, wine=WINE),
                             gpu_targets="gfx1100,gfx90a")
    argv = (tmp_path / "gpu.log").read_text().split()
    assert "--offload-arch=gfx1100,gfx90a" in argv and "-DGGML_USE_HIPBLAS" in argv
    assert aligned_entry(result.binaries["llamafile"], "ggml-rocm.so") == b"\x7fELF fake ggml gpu module"


def test_llamafile_cuda_preflight_names_missing_nvcc_mock_detection(tmp_path, project, home, monkeypatch):
    """This machine has a real nvcc in /usr/local/cuda (detect_nvcc always looks there), so
    the "no nvcc" machine is simulated by replacing the detection: a mock, named as such."""
    from pylmserv.builders.backends import cuda
    from pylmserv.builders.probe import Tool

    cfg, lock = project()
    monkeypatch.setattr(cuda, "detect_nvcc", lambda env=None, run=None: Tool("nvcc"))
    with pytest.raises(ToolMissingError, match="needs nvcc") as info:
        build_llamafile(backend="cuda", config=cfg, lock=lock)
    assert "CUDA toolkit" in info.value.hint
    assert tool_log(tmp_path) == [] and not (home / "builds").exists()
    dry = build_llamafile(backend="cuda", config=cfg, lock=lock, dry_run=True)
    assert any(n.startswith("preflight would fail: --backend cuda needs nvcc") for n in dry.notes)


def test_llamafile_rocm_preflight_names_missing_hipcc(tmp_path, project, home):
    if shutil.which("hipcc", path="/usr/bin:/bin"):
        pytest.skip("a real hipcc is installed on this machine")
    cfg, lock = project()
    proc = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "--backend", "rocm",
                   env={"PATH": "/usr/bin:/bin", "ROCM_PATH": str(tmp_path / "no-rocm")})
    assert proc.returncode == 5, proc.stderr
    assert "error: --backend rocm needs hipcc" in proc.stderr and "hint:" in proc.stderr and "Traceback" not in proc.stderr
    assert tool_log(tmp_path) == []


def test_llamafile_fixture_cli_json_build_then_noop(tmp_path, project, home):
    cfg, lock = project()
    env = {"PYLMSERV_BINFMT_DIR": str(fabricate(tmp_path, wine=WINE))}
    first = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "-j", "2", "--json", env=env)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["what"] == "llamafile" and doc["backend"] == "cpu" and not doc["cache_hit"]
    assert set(doc["paths"]) == {"llamafile", "zipalign", "llamafiler"}
    assert all(Path(p).is_file() and os.access(p, os.X_OK) for p in doc["paths"].values())
    second = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "-j", "2", "--json", env=env)
    assert second.returncode == 0 and json.loads(second.stdout)["cache_hit"]
    prefix = tmp_path / "inst"
    third = run_cli("--config", cfg, "--lock", lock, "build", "llamafile", "--prefix", prefix, env=env)
    assert third.returncode == 0, third.stderr
    assert (prefix / "bin" / "llamafile").is_file() and (prefix / "bin" / "zipalign").is_file()


def test_default_cuda_archs_follow_what_nvcc_supports():
    from pylmserv.builders.llamafile import DEFAULT_CUDA_ARCHS, default_cuda_archs

    cuda13 = "compute_75\ncompute_80\ncompute_86\ncompute_87\ncompute_89\ncompute_90\ncompute_100\ncompute_120\ncompute_121\n"
    assert default_cuda_archs("/x/nvcc", run=lambda argv, t: (0, cuda13)) == ("75", "80", "86", "89", "90", "100", "120")
    cuda12 = "".join(f"compute_{a}\n" for a in (50, 52, 60, 61, 70, 75, 80, 86, 89, 90))
    assert default_cuda_archs("/x/nvcc", run=lambda argv, t: (0, cuda12))[:3] == ("60", "61", "70")
    assert default_cuda_archs("/x/nvcc", run=lambda argv, t: (1, "nvcc fatal: Unknown option")) == DEFAULT_CUDA_ARCHS


def test_llamafile_fixture_cuda_module_with_real_nvcc(tmp_path, project, home, monkeypatch):
    """The GPU step with the real nvcc installed on this machine (compiling needs no GPU):
    the exact flags pylmserv passes are accepted and give a real shared object, which
    ends up inside the llamafile zip. The cosmocc side is still the fixture."""
    from pylmserv.builders.backends import cuda
    from pylmserv.builders.llamafile import default_cuda_archs

    nvcc = cuda.detect_nvcc()
    if not nvcc.found:
        pytest.skip("no real nvcc on this machine")
    monkeypatch.setenv("HOME", str(tmp_path / "userhome"))  # nvcc may write caches under HOME
    cfg, lock = project()
    archs = default_cuda_archs()
    dry = build_llamafile(backend="cuda", config=cfg, lock=lock, dry_run=True)
    compile_line = next(line for line in dry.commands if " -c " in line)
    assert all(f"-gencode=arch=compute_{a},code=sm_{a}" in compile_line for a in archs)
    result = build_llamafile(backend="cuda", config=cfg, lock=lock, binfmt_dir=fabricate(tmp_path, wine=WINE),
                             cuda_arch=archs[0])
    dso = result.build_dir / "gpu" / "ggml-cuda.so"
    data = dso.read_bytes()
    assert data.startswith(b"\x7fELF") and b"ggml_cuda_fixture_probe" in data
    assert aligned_entry(result.binaries["llamafile"], "ggml-cuda.so") == data
    assert aligned_entry(result.binaries["llamafiler"], "ggml-cuda.so") == data


def test_llamafile_fixture_local_source_dir(tmp_path, project, home):
    cfg, lock = project()
    tree = write_tree(tmp_path / "local-tree")
    binfmt = fabricate(tmp_path, wine=WINE)
    result = build_llamafile(config=cfg, lock=lock, source_dir=tree, binfmt_dir=binfmt, jobs=1)
    assert result.source == tree and "llamafile" in result.binaries
    assert not (tree / ".cosmocc").exists() and not (tree / "o").exists()  # the user's tree is left alone
    (tree / "llamafile" / "main.c").write_text("#error changed locally\n")
    with pytest.raises(BuildError, match="make failed"):
        build_llamafile(config=cfg, lock=lock, source_dir=tree, binfmt_dir=binfmt, jobs=1)
