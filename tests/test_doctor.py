"""`pylmserv doctor` against fabricated machines.

GPU tools cannot exist here, so nvidia-smi / nvcc / rocminfo / hipcc / vulkaninfo / glslc
are stand-in scripts printing the real tools' output format (tests/support/standin_tools.py);
the tests using them say `standin` in their names. Everything else is real: the real
compilers, cmake, git and Nix of this machine, real directories for the store and
binfmt_misc, a real tmpfs for a nearly full disk where mounting is permitted.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from pylmserv.app.doctor import FAIL, OK, WARN, Machine, check_lock, check_nix, check_store, diagnose
from tests.conftest import run_cli
from tests.support import standin_tools as st
from tests.support.tools import missing, require  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SYSTEM_NVCC = Path("/usr/local/cuda/bin/nvcc")  # toolchain.detect_nvcc also looks here, off PATH


def machine(tmp_path, *bins, **kw) -> Machine:
    """A Machine whose PATH holds the stand-ins in `bins` and this machine's non-GPU tools only."""
    env = {"PATH": st.path_with(*(bins or [tmp_path / "bin"])), "HOME": str(tmp_path)}
    env.update(kw.pop("env", {}))
    kw.setdefault("sysfs_drm", tmp_path / "no-drm")
    kw.setdefault("binfmt_dir", tmp_path / "no-binfmt")
    kw.setdefault("store_root", tmp_path / "store")
    return Machine(environ=env, **kw)


def by_name(checks):
    return {c.name: c for c in checks}


def gpu_checks(m, backend=None):
    from pylmserv.app.doctor import check_gpus

    return by_name(check_gpus(m, backend))


# -- GPUs and toolchains (stand-ins) -------------------------------------------------------

def test_standin_nvidia_gpu_with_matching_nvcc(tmp_path):
    bins = tmp_path / "bin"
    st.nvidia_smi(bins, gpus=[st.RTX_3090], driver="550.54.14", cuda="12.4")
    st.nvcc(bins, "12.4")
    checks = gpu_checks(machine(tmp_path, bins))
    gpu = checks["gpu-nvidia"]
    assert gpu.status == OK
    assert "NVIDIA GeForce RTX 3090 (compute 8.6)" in gpu.detail
    assert "driver 550.54.14" in gpu.detail and "CUDA <= 12.4" in gpu.detail
    cuda = checks["cuda-toolkit"]
    assert cuda.status == OK, cuda
    assert "nvcc 12.4" in cuda.detail and str(bins / "nvcc") in cuda.detail


def test_standin_nvcc_13_cannot_target_pascal(tmp_path):
    bins = tmp_path / "bin"
    st.nvidia_smi(bins, gpus=[st.GTX_1080], driver="580.65.06", cuda="13.0")
    st.nvcc(bins, "13.0")
    cuda = gpu_checks(machine(tmp_path, bins))["cuda-toolkit"]
    assert cuda.status == WARN
    assert "cannot target NVIDIA GeForce GTX 1080 (sm_61)" in cuda.detail
    assert "sm_75 and newer" in cuda.detail
    assert "CUDA 12.x" in cuda.hint


def test_standin_driver_older_than_nvcc(tmp_path):
    bins = tmp_path / "bin"
    st.nvidia_smi(bins, gpus=[st.RTX_3090], driver="550.54.14", cuda="12.4")
    st.nvcc(bins, "13.0")
    cuda = gpu_checks(machine(tmp_path, bins))["cuda-toolkit"]
    assert cuda.status == WARN
    assert "driver supports CUDA <= 12.4 but nvcc is 13.0" in cuda.detail
    assert "Update the NVIDIA driver" in cuda.hint


def test_standin_nvidia_gpu_without_nvcc(tmp_path):
    bins = tmp_path / "bin"
    st.nvidia_smi(bins, gpus=[st.H100])
    m = machine(tmp_path, bins)
    checks = gpu_checks(m)
    assert checks["gpu-nvidia"].status == OK and "H100" in checks["gpu-nvidia"].detail
    cuda = checks["cuda-toolkit"]
    if SYSTEM_NVCC.exists():
        # This machine has a CUDA toolkit off PATH: doctor finds it and says it is not on PATH.
        assert cuda.status == WARN and "(not on PATH)" in cuda.detail
        assert f"Add {SYSTEM_NVCC.parent} to PATH" in cuda.hint
    else:
        assert cuda.status == WARN
        assert cuda.detail == "NVIDIA GPU found, no CUDA toolkit (nvcc not found)"
        assert "nix develop .#cuda" in cuda.hint
    # Asked for CUDA explicitly, a missing nvcc is a failure (only where nvcc really is absent).
    if not SYSTEM_NVCC.exists():
        assert gpu_checks(m, "cuda")["cuda-toolkit"].status == FAIL


def test_standin_amd_gpu_no_rocm_cuda_requested(tmp_path):
    """The seed's story: an AMD card, no ROCm, and a CUDA build asked for."""
    bins = tmp_path / "bin"
    st.rocminfo(bins, gpus=[("gfx1100", "Radeon RX 7900 XTX")])
    checks = gpu_checks(machine(tmp_path, bins), "cuda")
    assert checks["gpu-amd"].status == OK and "gfx1100" in checks["gpu-amd"].detail
    backend = checks["backend"]
    assert backend.status == FAIL
    assert backend.detail == "AMD GPU found; CUDA was requested"
    assert "--backend rocm" in backend.hint
    rocm = checks["rocm-toolkit"]
    assert rocm.status == WARN and rocm.detail.startswith("AMD GPU found, no ROCm (hipcc not found)")


def test_standin_amd_gpu_with_hipcc(tmp_path):
    bins = tmp_path / "bin"
    st.rocminfo(bins, gpus=[("gfx1100", "Radeon RX 7900 XTX"), ("gfx90a", "AMD Instinct MI210")])
    st.hipcc(bins)
    checks = gpu_checks(machine(tmp_path, bins), "rocm")
    assert checks["backend"].status == OK
    rocm = checks["rocm-toolkit"]
    assert rocm.status == OK, rocm
    assert "hipcc 6.2" in rocm.detail and "gfx1100, gfx90a" in rocm.detail


def test_standin_rocm_requested_on_nvidia(tmp_path):
    bins = tmp_path / "bin"
    st.nvidia_smi(bins)
    checks = gpu_checks(machine(tmp_path, bins), "rocm")
    assert checks["backend"].status == FAIL
    assert checks["backend"].detail == "NVIDIA GPU found; ROCm was requested"
    assert checks["rocm-toolkit"].status == FAIL


def test_standin_vulkan_needs_glslc(tmp_path):
    bins = tmp_path / "bin"
    st.vulkaninfo(bins, devices=[("AMD Radeon RX 6600 (RADV NAVI23)", "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU", "0x1002")])
    m = machine(tmp_path, bins)
    checks = gpu_checks(m, "vulkan")
    assert checks["gpu-vulkan"].detail == "devices: AMD Radeon RX 6600 (RADV NAVI23)"
    assert checks["vulkan-toolkit"].status == FAIL and "glslc (apt-get install glslc)" in checks["vulkan-toolkit"].detail
    st.glslc(bins)
    assert gpu_checks(m, "vulkan")["vulkan-toolkit"].status == OK


def test_standin_nvidia_smi_without_driver(tmp_path):
    bins = tmp_path / "bin"
    st.nvidia_smi(bins, broken=True)
    gpu = gpu_checks(machine(tmp_path, bins))["gpu-nvidia"]
    assert gpu.status == WARN
    assert "couldn't communicate with the NVIDIA driver" in gpu.detail


def test_no_gpu_tools_is_fine(tmp_path):
    checks = gpu_checks(machine(tmp_path))
    assert {c.status for c in checks.values()} == {OK}
    assert "cuda-toolkit" not in checks and "backend" not in checks


def test_cuda_requested_without_any_gpu_is_a_warning(tmp_path):
    # A build host without a GPU may still build CUDA binaries for elsewhere.
    backend = gpu_checks(machine(tmp_path), "cuda")["backend"]
    assert backend.status == WARN and backend.detail == "no NVIDIA GPU found; CUDA was requested"


# -- build tools ---------------------------------------------------------------------------

def test_missing_compilers_fail(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    m = Machine(environ={"PATH": str(bare)}, sysfs_drm=tmp_path, binfmt_dir=tmp_path / "x",
                store_root=tmp_path / "store")
    from pylmserv.app.doctor import check_build_tools

    checks = by_name(check_build_tools(m))
    assert checks["c-compiler"].status == FAIL and "apt-get install gcc" in checks["c-compiler"].hint
    assert checks["c++-compiler"].status == FAIL
    assert checks["ccache"].status == WARN
    # cmake/ninja fall back to the PyPI wheels when installed (the builder's bootstrap):
    # off PATH, the wheel is what doctor must find; without it, cmake is missing.
    import importlib.util

    if importlib.util.find_spec("cmake") is None:
        assert checks["cmake"].status == FAIL
    else:
        assert checks["cmake"].status == OK and "(pip-wheel)" in checks["cmake"].detail


def test_real_build_tools_of_this_machine(tmp_path):
    from pylmserv.app.doctor import check_build_tools

    checks = by_name(check_build_tools(Machine.current(store_root=tmp_path)))
    assert checks["c-compiler"].status == OK
    assert checks["cmake"].status == OK and ">= 3.18 needed" in checks["cmake"].detail


# -- Nix -----------------------------------------------------------------------------------

def test_nix_flakes_enabled_and_disabled(tmp_path):
    require(shutil.which("nix"), "real Nix", "apt-get install nix-bin; scripts/setup-dev.sh installs it")
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "NIX_REMOTE": ""}
    on = by_name(check_nix(Machine(environ=dict(base, NIX_CONFIG="experimental-features = nix-command flakes"))))
    assert on["nix"].status == OK and "Nix" in on["nix"].detail
    assert on["nix-flakes"].status == OK
    off = by_name(check_nix(Machine(environ=dict(base, NIX_CONFIG="experimental-features ="))))
    assert off["nix-flakes"].status == WARN and "experimental-features = nix-command flakes" in off["nix-flakes"].hint


def test_nix_missing_is_a_warning(tmp_path):
    checks = check_nix(Machine(environ={"PATH": str(tmp_path)}))
    assert [c.name for c in checks] == ["nix"] and checks[0].status == WARN


# -- store --------------------------------------------------------------------------------

def test_store_sizes(tmp_path):
    root = tmp_path / "store"
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "blobs" / "sha256" / ("a" * 64)).write_bytes(b"x" * 3 * 1024 * 1024)
    (root / "builds" / "k").mkdir(parents=True)
    (root / "builds" / "k" / "obj.o").write_bytes(b"y" * 2048)
    (check,) = check_store(machine(tmp_path, store_root=root))
    assert check.status == OK
    assert str(root) in check.detail
    assert "blobs 3.0 MiB" in check.detail and "builds 2.0 KiB" in check.detail


def test_store_nearly_full_by_threshold(tmp_path):
    """Free space under the threshold (PYLMSERV_DOCTOR_MIN_FREE raised above what is free)."""
    root = tmp_path / "store"
    root.mkdir()
    free = shutil.disk_usage(root).free
    (check,) = check_store(machine(tmp_path, store_root=root, env={"PYLMSERV_DOCTOR_MIN_FREE": str(free + (1 << 40))}))
    assert check.status == WARN
    assert "free space or set PYLMSERV_HOME" in check.hint


def test_store_nearly_full_real_tmpfs(tmp_path):
    """A real 2 MiB tmpfs as the store's filesystem (needs mount permission; skipped without)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    try:
        (mnt / "blobs").mkdir()
        (mnt / "blobs" / "big").write_bytes(b"z" * (1024 * 1024))
        (check,) = check_store(machine(tmp_path, store_root=mnt))
        assert check.status == FAIL
        assert "free of 2.0 MiB" in check.detail and "blobs 1.0 MiB" in check.detail
        assert "PYLMSERV_HOME" in check.hint
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_store_not_created_yet_measures_parent(tmp_path):
    (check,) = check_store(machine(tmp_path, store_root=tmp_path / "a" / "b" / "store"))
    assert check.status == OK and "empty" in check.detail
    assert not (tmp_path / "a").exists()  # doctor never creates the store


def test_store_unreadable_disk_usage(tmp_path):
    def broken(path):
        raise PermissionError(13, "Permission denied")

    (check,) = check_store(machine(tmp_path, disk_usage=broken))
    assert check.status == FAIL and "cannot read disk usage" in check.detail


# -- lock ----------------------------------------------------------------------------------

def _project(tmp_path, lock_text=None):
    cfg = tmp_path / "pylmserv.toml"
    shutil.copy(REPO / "pylmserv.toml", cfg)
    if lock_text is not None:
        (tmp_path / "pylmserv.lock").write_text(lock_text)
    return cfg


def test_lock_in_sync(tmp_path):
    cfg = _project(tmp_path, (REPO / "pylmserv.lock").read_text())
    check = check_lock(cfg, None)
    assert check.status == OK
    assert "in sync" in check.detail and "gemma-2b" in check.detail  # the deliberately unpinned one


def test_lock_missing(tmp_path):
    check = check_lock(_project(tmp_path), None)
    assert check.status == FAIL and check.hint == "Run `pylmserv prefetch` to create it."


def test_lock_drift(tmp_path):
    text = (REPO / "pylmserv.lock").read_text().replace('ref = "b9941"', 'ref = "b9000"')
    check = check_lock(_project(tmp_path, text), None)
    assert check.status == WARN
    assert "source llama-cpp: config ref b9941 but lock ref b9000" in check.detail
    assert "pylmserv prefetch" in check.hint


def test_lock_unreadable(tmp_path):
    check = check_lock(_project(tmp_path, "version = 1\n[sources\n"), None)
    assert check.status == FAIL and "invalid TOML" in check.detail


# -- the whole report, the CLI ------------------------------------------------------------

def test_diagnose_survives_a_broken_probe(tmp_path, monkeypatch):
    import pylmserv.app.doctor as doctor

    def boom(machine, backend, *rest):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(doctor, "check_gpus", boom)
    report = diagnose(machine(tmp_path), config=_project(tmp_path, (REPO / "pylmserv.lock").read_text()))
    gpus = by_name(report.checks)["gpus"]
    assert gpus.status == WARN and "probe exploded" in gpus.detail
    assert "store" in by_name(report.checks)  # the rest still ran


def test_cli_json_schema_and_exit_code(tmp_path, home):
    proc = run_cli("doctor", "--json", cwd=REPO)
    data = json.loads(proc.stdout)
    assert list(data) == ["checks"]
    names = []
    for c in data["checks"]:
        assert set(c) == {"name", "status", "detail", "hint"}
        assert c["status"] in ("ok", "warn", "fail")
        assert isinstance(c["detail"], str) and c["detail"]
        assert c["status"] == "ok" or c["hint"], c
        names.append(c["name"])
    for expected in ("python", "pylmserv", "cmake", "ninja", "c-compiler", "c++-compiler", "ccache", "git", "unzip",
                     "curl", "nix", "gpu-nvidia", "gpu-amd", "gpu-vulkan", "binfmt_misc", "store", "lock"):
        assert expected in names
    failed = any(c["status"] == "fail" for c in data["checks"])
    assert proc.returncode == (1 if failed else 0)
    assert "Traceback" not in proc.stderr


def test_cli_fails_when_a_check_fails(tmp_path, home):
    # No lock next to the config: the lock check fails, so doctor exits 1.
    cfg = _project(tmp_path)
    proc = run_cli("--config", cfg, "doctor", cwd=tmp_path)
    assert proc.returncode == 1
    # The report is the command's answer: stdout (it pipes), nothing of it on stderr.
    assert "[FAIL] lock" in proc.stdout and "hint: Run `pylmserv prefetch` to create it." in proc.stdout
    assert "[FAIL]" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_backend_mismatch_standin(tmp_path, home):
    bins = tmp_path / "bin"
    st.rocminfo(bins)
    env = {"PATH": st.path_with(bins)}
    proc = run_cli("doctor", "--json", "--backend", "cuda", env=env, cwd=REPO)
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["backend"]["status"] == "fail"
    assert checks["backend"]["detail"] == "AMD GPU found; CUDA was requested"
    assert proc.returncode == 1


def test_no_color(tmp_path, home, monkeypatch):
    from pylmserv.cli import cli

    monkeypatch.chdir(REPO)
    runner = CliRunner()
    colored = runner.invoke(cli, ["doctor"], color=True, env={"NO_COLOR": ""})
    plain = runner.invoke(cli, ["doctor"], color=True, env={"NO_COLOR": "1"})
    out_colored, out_plain = colored.stdout, plain.stdout
    assert "\x1b[" in out_colored
    assert "\x1b[" not in out_plain and "[ok  ] python" in out_plain


# -- binfmt_misc (fabricated directories in the kernel's file format) ------------------------

def fake_binfmt(root: Path, entries: dict, status: str = "enabled") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "status").write_text(status + "\n")
    (root / "register").write_text("")
    for name, (interpreter, magic_hex) in entries.items():
        (root / name).write_text(f"enabled\ninterpreter {interpreter}\nflags: \noffset 0\nmagic {magic_hex}\n")
    return root


def binfmt_check(tmp_path, directory):
    from pylmserv.app.doctor import check_binfmt

    return check_binfmt(machine(tmp_path, binfmt_dir=directory, system="Linux"))


def test_binfmt_wine_registered_for_mz(tmp_path):
    d = fake_binfmt(tmp_path / "binfmt", {"wine": ("/usr/bin/wine", "4d5a"),
                                          "python3.11": ("/usr/bin/python3.11", "a70d0d0a")})
    check = binfmt_check(tmp_path, d)
    assert check.status == WARN
    assert "wine (/usr/bin/wine)" in check.detail
    lines = check.hint.splitlines()
    assert f"sudo sh -c 'echo 0 > {d / 'wine'}'   # disable wine until reboot" in lines
    assert "sudo update-binfmts --disable wine   # keep it disabled across reboots (binfmt-support)" in lines
    assert any(":APE:M::MZqFpD::/usr/bin/ape:" in line for line in lines)


def test_binfmt_run_detectors_for_mz(tmp_path):
    d = fake_binfmt(tmp_path / "binfmt", {"cli": ("/usr/lib/binfmt-support/run-detectors", "4d5a")})
    check = binfmt_check(tmp_path, d)
    assert check.status == WARN and "run-detectors" in check.detail
    assert "sudo update-binfmts --disable cli" in check.hint


def test_binfmt_ape_registered(tmp_path):
    d = fake_binfmt(tmp_path / "binfmt", {"APE": ("/usr/bin/ape", "4d5a71467044"),
                                          "APE-jart": ("/usr/bin/ape", "6a6172747372")})
    check = binfmt_check(tmp_path, d)
    assert check.status == OK
    assert "APE loader registered" in check.detail and "APE -> /usr/bin/ape" in check.detail


def test_binfmt_neither(tmp_path):
    d = fake_binfmt(tmp_path / "binfmt", {"python3.11": ("/usr/bin/python3.11", "a70d0d0a")})
    check = binfmt_check(tmp_path, d)
    assert check.status == OK
    assert "no binfmt_misc rule for APE files" in check.detail
    assert ":APE:M::MZqFpD::/usr/bin/ape:" in check.hint  # the fix is still there for --json users


def test_binfmt_fix_names_the_stores_ape_loader(tmp_path):
    import platform

    store = tmp_path / "store"
    loader = store / "toolchains" / "cosmocc-3.3.6-abc" / "bin" / f"ape-{platform.machine()}.elf"
    loader.parent.mkdir(parents=True)
    loader.write_bytes(b"\x7fELF")
    d = fake_binfmt(tmp_path / "binfmt", {"wine": ("/usr/bin/wine", "4d5a")})
    check = binfmt_check(tmp_path, d)
    assert f"sudo cp {loader} /usr/bin/ape" in check.hint


def test_binfmt_not_mounted(tmp_path):
    check = binfmt_check(tmp_path, tmp_path / "absent")
    assert check.status == OK and "not mounted" in check.detail


def test_binfmt_skipped_off_linux(tmp_path):
    from pylmserv.app.doctor import check_binfmt

    check = check_binfmt(machine(tmp_path, system="Darwin"))
    assert check.status == OK and "not used on Darwin" in check.detail


def test_cli_prints_multi_line_fix(tmp_path, home, monkeypatch):
    """The human report prints each fix command on its own line."""
    from pylmserv.app import doctor
    from pylmserv.cli import cli

    d = fake_binfmt(tmp_path / "binfmt", {"wine": ("/usr/bin/wine", "4d5a")})
    real_current = doctor.Machine.current.__func__
    monkeypatch.setattr(doctor.Machine, "current",
                        classmethod(lambda cls, **kw: real_current(cls, binfmt_dir=d, system="Linux", **kw)))
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(cli, ["doctor"], env={"NO_COLOR": "1"})
    out = result.stdout
    wine_lines = [line for line in out.splitlines() if "wine" in line]
    assert any(line.startswith("[warn] binfmt_misc") for line in wine_lines)
    assert any(line.strip().startswith("hint: sudo sh -c 'echo 0 >") for line in wine_lines)
    assert any(line.strip().startswith("sudo update-binfmts --disable wine") for line in wine_lines)


def test_standin_metal_on_macos(tmp_path):
    bins = tmp_path / "bin"
    st.xcode(bins)
    checks = gpu_checks(machine(tmp_path, bins, system="Darwin"), "metal")
    assert checks["gpu-metal"].status == OK
    assert checks["gpu-metal"].detail == "Metal via Xcode at /Applications/Xcode.app/Contents/Developer"
    assert checks["backend"].status == OK


def test_standin_macos_command_line_tools_only(tmp_path):
    bins = tmp_path / "bin"
    st.xcode(bins, developer_dir="/Library/Developer/CommandLineTools", metal=False)
    metal = gpu_checks(machine(tmp_path, bins, system="Darwin"))["gpu-metal"]
    assert metal.status == OK and "no `metal` compiler" in metal.detail


def test_macos_without_xcode_and_metal_on_linux(tmp_path):
    mac = gpu_checks(machine(tmp_path, system="Darwin"))["gpu-metal"]
    assert mac.status == WARN and mac.hint == "xcode-select --install"
    linux = gpu_checks(machine(tmp_path, system="Linux"), "metal")
    assert "gpu-metal" not in linux
    assert linux["backend"].status == FAIL and "Metal was requested on Linux" in linux["backend"].detail
