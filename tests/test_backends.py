"""Backend selection and the checks that stop a build before the compiler would.

- `--backend auto`: stand-in machines (nvidia-smi, nvcc, rocminfo, hipcc, vulkaninfo, glslc
  printing the real tools' formats on an ISOLATED PATH: tests say `standin`) and this real
  machine (lavapipe is a software rasterizer: never vulkan).
- ROCm too old: the HIP minimum is read from the real llama.cpp source's
  ggml-hip/CMakeLists.txt; the real Debian hipcc 5.2 where installed (setup-dev.sh), a
  stand-in hipcc 5.2 otherwise.
- Vulkan headers: the real headers of this machine (Debian 12: 1.3.239) against the real
  sources: the vendored llama.cpp of llama-cpp-python 0.3.36 is refused, 0.3.9's is not.
- doctor and the build's preflight give the same verdict in the same words.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from pylmserv.builders.backends import blas, cuda, rocm, vulkan
from pylmserv.builders import toolchain as tc
from pylmserv.builders.auto import choose_backend
from tests.conftest import run_cli
from tests.support import llama_source
from tests.support import standin_tools as st
from tests.support.tools import missing, require  # noqa: F401

NO_DRM = Path("/nonexistent/drm")


def isolated(bins: Path) -> dict:
    return {"PATH": st.path_with(bins), "HOME": str(bins.parent)}


def recording_tool(bins: Path, name: str) -> Path:
    """A tool that must not be called: it leaves a marker when it is."""
    marker = bins.parent / f"{name}.called"
    path = bins / name
    bins.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 1\n")
    path.chmod(0o755)
    return marker


# -- --backend auto ---------------------------------------------------------------------------

def test_auto_standin_nvidia_with_toolkit_and_cublas_chooses_cuda(tmp_path):
    bins = tmp_path / "bin"
    st.nvidia_smi(bins, gpus=[st.RTX_3090])
    st.nvcc(bins, "12.4")
    toolkit = tmp_path / "cuda"
    (toolkit / "lib64").mkdir(parents=True)
    (toolkit / "lib64" / "libcublas.so").write_bytes(b"")
    env = {**isolated(bins), "CUDA_PATH": str(toolkit)}
    choice = choose_backend("llama.cpp", env=env, sysfs=NO_DRM, platform="linux", cublas_wheel_dirs=[])
    assert choice.backend == "cuda"
    assert "RTX 3090 (sm_86)" in choice.reason and "nvcc 12.4" in choice.reason and "libcublas.so" in choice.reason


def test_auto_standin_nvidia_without_cublas_is_not_cuda_and_says_why(tmp_path):
    bins = tmp_path / "bin"
    st.nvidia_smi(bins, gpus=[st.RTX_3090])
    st.nvcc(bins, "12.4")
    env = {**isolated(bins), "CUDA_PATH": str(tmp_path / "cuda-without-cublas")}
    choice = choose_backend("llama.cpp", env=env, sysfs=NO_DRM, platform="linux", cublas_wheel_dirs=[])
    assert choice.backend in ("cpu", "blas")
    assert any(p.startswith("cuda:") and "no cuBLAS" in p for p in choice.passed_over)
    # llamafile's module needs no cuBLAS (tinyBLAS): there cuda is usable
    assert choose_backend("llamafile", env=env, sysfs=NO_DRM, platform="linux").backend == "cuda"


def test_auto_standin_amd_gpu_never_asks_for_nvcc(tmp_path):
    """The llamafile trap: an AMD machine must never be sent looking for nvcc."""
    bins = tmp_path / "bin"
    st.rocminfo(bins, gpus=[("gfx1100", "Radeon RX 7900 XTX")])
    st.hipcc(bins, "6.2.41133-dd7f95766")
    nvcc_called = recording_tool(bins, "nvcc")
    smi_called = recording_tool(bins, "nvidia-smi")
    for engine in ("llama.cpp", "llamafile"):
        choice = choose_backend(engine, env=isolated(bins), sysfs=NO_DRM, platform="linux")
        assert choice.backend == "rocm", choice
        assert "gfx1100" in choice.reason and "HIP 6.2" in choice.reason
    assert not nvcc_called.exists()
    assert smi_called.exists()  # asking "is there an NVIDIA GPU?" is fine; asking for its compiler is not


def test_auto_standin_amd_gpu_with_too_old_hip_says_so(tmp_path):
    bins = tmp_path / "bin"
    st.rocminfo(bins, gpus=[("gfx1030", "Radeon RX 6800")])
    st.hipcc(bins, "5.2.21153-0")
    choice = choose_backend("llama.cpp", env=isolated(bins), sysfs=NO_DRM, platform="linux", min_hip=(6, 1))
    assert choice.backend in ("cpu", "blas")
    assert "rocm: gfx1030 but HIP 5.2.21153 < 6.1 needed" in choice.passed_over
    assert "--backend auto chose" in choice.describe() and "not taken: rocm" in choice.describe()


def test_auto_standin_hardware_vulkan_with_sdk_chooses_vulkan(tmp_path):
    bins = tmp_path / "bin"
    st.vulkaninfo(bins, devices=[("AMD Radeon RX 7600 (RADV NAVI33)", "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU", "0x1002")])
    st.glslc(bins)
    sdk = vulkan.VulkanSdk(vulkan.detect_glslc(isolated(bins)), "/usr/include", (1, 3, 275), True, "/usr/lib/libvulkan.so", ())
    choice = choose_backend("llama.cpp", env=isolated(bins), sysfs=NO_DRM, platform="linux", vulkan_sdk=sdk)
    assert choice.backend == "vulkan" and "RADV NAVI33" in choice.reason
    # the same device without glslc: not vulkan, and the missing package is named
    no_glslc = vulkan.VulkanSdk(tc.Tool("glslc"), "/usr/include", (1, 3, 275), True, "/usr/lib/libvulkan.so", ())
    choice = choose_backend("llama.cpp", env=isolated(bins), sysfs=NO_DRM, platform="linux", vulkan_sdk=no_glslc)
    assert choice.backend != "vulkan" and any("apt-get install glslc" in p for p in choice.passed_over)


def test_auto_standin_lavapipe_only_is_not_vulkan(tmp_path):
    bins = tmp_path / "bin"
    st.vulkaninfo(bins, devices=[("llvmpipe (LLVM 15.0.6, 256 bits)", "PHYSICAL_DEVICE_TYPE_CPU", "0x10005")])
    choice = choose_backend("llama.cpp", env=isolated(bins), sysfs=NO_DRM, platform="linux")
    assert choice.backend in ("cpu", "blas") and any("software rasterizer" in p for p in choice.passed_over)


def test_auto_apple_silicon_is_metal():
    assert choose_backend("llama.cpp", env={"PATH": ""}, platform="darwin", machine="arm64").backend == "metal"
    assert choose_backend("llamafile", env={"PATH": ""}, platform="darwin", machine="arm64").backend == "cpu"


def test_auto_on_this_real_machine_and_cli_says_why(home, tmp_path):
    """No GPU here. If vulkaninfo sees lavapipe, it is passed over as software; blas when
    OpenBLAS is installed, else cpu."""
    choice = choose_backend("llama.cpp")
    expected = "blas" if blas.detect_blas() else "cpu"
    if not cuda.detect_nvidia_gpus():
        assert choice.backend == expected, choice
    devices = vulkan.detect_vulkan_devices() or ()
    if devices and all(d.software for d in devices):
        assert any("software rasterizer" in p for p in choice.passed_over)
    repo = Path(__file__).resolve().parent.parent
    proc = run_cli("--config", repo / "pylmserv.toml", "build", "--backend", "auto", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["backend"] == choice.backend and doc["auto"] == choice.describe()
    assert f"--backend auto chose {choice.backend}: " in proc.stderr  # printed, also in a dry run
    plain = run_cli("--config", repo / "pylmserv.toml", "build", "--backend", "auto", "--dry-run")
    assert f"--backend auto chose {choice.backend}" in plain.stderr


def test_seed_compatible_cuda_true_means_auto(home, tmp_path):
    import pylmserv

    repo = Path(__file__).resolve().parent.parent
    result = pylmserv.build_llama_cpp(tmp_path / "out", cuda=True, dry_run=True, config=repo / "pylmserv.toml")
    assert result.auto and result.auto.startswith(f"--backend auto chose {result.backend}")
    assert pylmserv.build_llama_cpp(tmp_path / "out", cuda=False, dry_run=True,
                                    config=repo / "pylmserv.toml").backend == "cpu"


# -- ROCm: too old for the source ---------------------------------------------------------------

def _cmake_tree(dest: Path, version: str = llama_source.SDIST_VERSION) -> Path:
    """The CMake files of the real vendored llama.cpp (enough for --source and the checks)."""
    llama_source.require_sdist() if version == llama_source.SDIST_VERSION else None
    sdist = llama_source.sdist_path(version)
    if not sdist.is_file():
        missing(f"{sdist}", "scripts/setup-dev.sh downloads it")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = ("CMakeLists.txt", "ggml/CMakeLists.txt", "ggml/src/ggml-hip/CMakeLists.txt",
              "ggml/src/ggml-vulkan/ggml-vulkan.cpp", "common/CMakeLists.txt")
    with tarfile.open(sdist) as tf:
        for rel in wanted:
            try:
                member = tf.getmember(prefix + rel)
            except KeyError:
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(member).read())
    return dest


def _hipcc_5_2(tmp_path) -> dict:
    """Debian 12's real hipcc (5.2) when installed; else a stand-in printing its --version."""
    real = shutil.which("hipcc", path="/usr/bin")
    if real and rocm.hip_version(tc.Tool("hipcc", real)) and rocm.hip_version(tc.Tool("hipcc", real))[:2] < (6, 1):
        return dict(os.environ)
    bins = tmp_path / "standin-bin"
    st.hipcc(bins, "5.2.21153-0")
    return {**os.environ, "PATH": f"{bins}{os.pathsep}{os.environ['PATH']}"}


def test_rocm_too_old_refused_before_configure_with_source_minimum(home, tmp_path):
    tree = _cmake_tree(tmp_path / "llama.cpp")
    assert rocm.required_hip_version(tree) == (6, 1)  # read from ggml/src/ggml-hip/CMakeLists.txt
    env = _hipcc_5_2(tmp_path)
    proc = run_cli("build", "--backend", "rocm", "--source", tree, env=env)
    assert proc.returncode == 5, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "HIP 5.2" in errors[0] and "needs HIP >= 6.1" in errors[0] and "rocm.docs.amd.com" in errors[0]
    assert not list((home / "builds").glob("*/CMakeCache.txt"))  # stopped before configure
    # doctor says the same words
    doc = run_cli("doctor", "--backend", "rocm", "--json", env=env)
    checks = {c["name"]: c for c in json.loads(doc.stdout)["checks"]}
    assert checks["build-preflight"]["status"] == "fail"
    assert "HIP 5.2" in checks["build-preflight"]["detail"] and "needs HIP >= 6.1" in checks["build-preflight"]["detail"]


def test_rocm_minimum_follows_the_source(tmp_path):
    old = tmp_path / "old"
    (old / "ggml/src/ggml-hip").mkdir(parents=True)
    (old / "ggml/src/ggml-hip/CMakeLists.txt").write_text(
        'if (${hip_VERSION} VERSION_LESS 5.5)\n    message(FATAL_ERROR "At least ROCM/HIP V5.5 is required")\nendif()\n')
    assert rocm.required_hip_version(old) == (5, 5)
    hipcc = tc.Tool("hipcc", "/opt/rocm/bin/hipcc")
    assert rocm.hip_too_old(hipcc, (5, 2, 21153), (5, 5), "x") and rocm.hip_too_old(hipcc, (5, 7, 1), (5, 5), "x") is None
    assert rocm.required_hip_version(tmp_path / "nothing-here") is None


# -- Vulkan headers vs the source ------------------------------------------------------------------

def _real_headers():
    sdk = vulkan.detect_vulkan_sdk()
    if not sdk.headers:
        missing("Vulkan C++ headers", "apt-get install libvulkan-dev; scripts/setup-dev.sh installs it")
    return sdk


def test_vulkan_headers_refuse_vendored_0_3_36_accept_0_3_9(home, tmp_path):
    """Debian 12's headers (1.3.239) vs the real ggml-vulkan.cpp of two llama.cpp versions."""
    sdk = _real_headers()
    new = _cmake_tree(tmp_path / "new")
    old = _cmake_tree(tmp_path / "old", "0.3.9")
    if sdk.header_version and sdk.header_version >= (1, 3, 275):
        pytest.skip(f"headers {sdk.header_version} are new enough for both")
    problem = vulkan.vulkan_headers_too_old(new, sdk)
    assert problem and "vk::LayerSettingEXT" in problem and "1.3.239" in problem or sdk.header_version != (1, 3, 239)
    assert vulkan.vulkan_headers_too_old(old, sdk) is None
    proc = run_cli("build", "--backend", "vulkan", "--source", new)
    assert proc.returncode == 5
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "too old for this llama.cpp" in errors[0]
    assert "nix develop .#vulkan" in proc.stderr and "Vulkan-Headers" in proc.stderr  # the ways out
    assert not list((home / "builds").glob("*/CMakeCache.txt"))


def test_vulkan_header_gaps_derived_from_source_not_a_table(tmp_path):
    headers = tmp_path / "inc"
    (headers / "vulkan").mkdir(parents=True)
    (headers / "vulkan" / "vulkan.hpp").write_text("namespace vk { struct Instance; struct Device; }\n")
    (headers / "vulkan" / "vulkan_core.h").write_text(
        "#define VK_HEADER_VERSION 204\n#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, 1, 2, VK_HEADER_VERSION)\n")
    src = tmp_path / "src"
    (src / "ggml/src/ggml-vulkan").mkdir(parents=True)
    (src / "ggml/src/ggml-vulkan/ggml-vulkan.cpp").write_text(
        "vk::Instance i;\n#if defined(VK_KHR_cooperative_matrix)\nvk::ComponentTypeKHR guarded;\n#endif\n"
        "vk::Device d;\nvk::ShinyNewThingEXT s;\n")
    sdk = vulkan.detect_vulkan_sdk(include_dirs=[headers], lib_dirs=[], icd_dirs=())
    assert sdk.header_version == (1, 2, 204)
    assert vulkan.vulkan_header_gaps(src, sdk.headers) == {"ShinyNewThingEXT": "ggml/src/ggml-vulkan/ggml-vulkan.cpp:6"}
    assert "vk::ShinyNewThingEXT" in vulkan.vulkan_headers_too_old(src, sdk)
    assert sdk.missing() == ["glslc (apt-get install glslc)", "SPIR-V headers (apt-get install spirv-headers)",
                             "the Vulkan loader libvulkan.so (apt-get install libvulkan-dev)"] \
        or vulkan.detect_glslc().found


def test_doctor_vulkan_real_machine_names_devices_and_software_rasterizer(home):
    require(shutil.which("vulkaninfo"), "vulkaninfo", "apt-get install vulkan-tools; scripts/setup-dev.sh installs it")
    devices = vulkan.detect_vulkan_devices()
    proc = run_cli("doctor", "--backend", "vulkan", "--json")
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    for d in devices or ():
        assert d.name in checks["gpu-vulkan"]["detail"]
    if devices and all(d.software for d in devices):
        assert checks["gpu-vulkan"]["status"] == "warn" and "software rasterizer" in checks["gpu-vulkan"]["detail"]
    sdk = vulkan.detect_vulkan_sdk()
    assert (checks["vulkan-toolkit"]["status"] == "ok") == (not sdk.missing() and bool(sdk.icds))


def test_doctor_vulkan_standin_names_the_missing_packages(tmp_path):
    from pylmserv.app.doctor import Machine, check_gpus

    bins = tmp_path / "bin"
    st.vulkaninfo(bins)
    m = Machine(environ={"PATH": st.path_with(bins), "HOME": str(tmp_path), "CPATH": str(tmp_path / "no-inc")},
                sysfs_drm=NO_DRM, binfmt_dir=tmp_path / "nb", store_root=tmp_path / "store")
    checks = {c.name: c for c in check_gpus(m, "vulkan")}
    assert checks["vulkan-toolkit"].status == "fail" and "glslc (apt-get install glslc)" in checks["vulkan-toolkit"].detail


# -- doctor agrees with the build's preflight ---------------------------------------------------

@pytest.mark.parametrize("backend", ["cuda", "rocm", "vulkan", "blas"])
def test_doctor_and_build_preflight_agree_on_this_machine(home, backend):
    repo = Path(__file__).resolve().parent.parent
    dry = run_cli("--config", repo / "pylmserv.toml", "build", "--backend", backend, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    build_says = [n[len("preflight would fail: "):] for n in json.loads(dry.stdout)["notes"]
                  if n.startswith("preflight would fail: ")]
    doc = run_cli("--config", repo / "pylmserv.toml", "doctor", "--backend", backend, "--json")
    check = {c["name"]: c for c in json.loads(doc.stdout)["checks"]}["build-preflight"]
    assert (check["status"] == "fail") == bool(build_says), (check, build_says)
    if build_says:
        assert check["detail"] in build_says
