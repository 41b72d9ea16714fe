"""Option mapping per backend and per llama.cpp version (no GPU, no compiler needed).

The current tree is the real one (CMake files of vendor/llama.cpp in the llama-cpp-python
sdist); older versions are synthetic CMake files carrying the switch names those releases
declared (the pre-b3173 LLAMA_* names, the LLAMA_CURL/WEBUI era)."""
from __future__ import annotations

import tarfile
import pytest

from pylmserv.builders.llama_cpp import CMAKE_FILES, Detected, Request, builtin_features, make_commands, map_options, scan_features, translate_arg
from pylmserv.core.errors import UsageError
from tests.support import llama_source


@pytest.fixture(scope="module")
def current_tree(tmp_path_factory):
    """Just the CMake files of the real vendored llama.cpp."""
    llama_source.require_sdist()
    root = tmp_path_factory.mktemp("llama-cmake")
    wanted = {llama_source.VENDOR_PREFIX + rel: rel for rel in CMAKE_FILES}
    with tarfile.open(llama_source.SDIST, "r:gz") as tf:
        for member in tf:
            rel = wanted.get(member.name)
            if rel and member.isfile():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(tf.extractfile(member).read())
    return root


LEGACY_CMAKE = """
cmake_minimum_required(VERSION 3.14)
project("llama.cpp" C CXX)
option(BUILD_SHARED_LIBS "build shared libraries" OFF)
option(LLAMA_NATIVE "llama: enable -march=native flag" ON)
option(LLAMA_BLAS "llama: use BLAS" OFF)
set(LLAMA_BLAS_VENDOR "Generic" CACHE STRING "llama: BLAS library vendor")
option(LLAMA_CUDA "llama: use CUDA" OFF)
option(LLAMA_HIPBLAS "llama: use hipBLAS" OFF)
option(LLAMA_VULKAN "llama: use Vulkan" OFF)
option(LLAMA_METAL "llama: use Metal" ${LLAMA_METAL_DEFAULT})
option(LLAMA_CURL "llama: use libcurl to download model from an URL" OFF)
option(LLAMA_BUILD_TESTS "llama: build tests" ${LLAMA_STANDALONE})
option(LLAMA_BUILD_EXAMPLES "llama: build examples" ${LLAMA_STANDALONE})
option(LLAMA_BUILD_SERVER "llama: build server example" ON)
"""

CURL_ERA_CMAKE = """
option(LLAMA_BUILD_TESTS "llama: build tests" ${LLAMA_STANDALONE})
option(LLAMA_BUILD_EXAMPLES "llama: build examples" ${LLAMA_STANDALONE})
option(LLAMA_BUILD_SERVER "llama: build server example" ${LLAMA_STANDALONE})
option(LLAMA_CURL "llama: use libcurl to download model from an URL" ON)
llama_option_depr(WARNING     LLAMA_CUDA                GGML_CUDA)
llama_option_depr(WARNING     LLAMA_NATIVE              GGML_NATIVE)
"""
CURL_ERA_GGML = """
option(GGML_NATIVE "ggml: optimize the build for the current system" ${GGML_NATIVE_DEFAULT})
option(GGML_BACKEND_DL "ggml: build backends as dynamic libraries (requires BUILD_SHARED_LIBS)" OFF)
option(GGML_CPU_ALL_VARIANTS "ggml: build all variants of the CPU backend (requires GGML_BACKEND_DL)" OFF)
option(GGML_CUDA "ggml: use CUDA" OFF)
option(GGML_HIP "ggml: use HIP" OFF)
option(GGML_BLAS "ggml: use BLAS" OFF)
set(GGML_BLAS_VENDOR ${GGML_BLAS_VENDOR_DEFAULT} CACHE STRING "ggml: BLAS library vendor")
option(GGML_VULKAN "ggml: use Vulkan" OFF)
"""
CURL_ERA_SERVER = """
option(LLAMA_SERVER_SSL "Build SSL support for the server" OFF)
"""
CURL_ERA_HIP = "if(AMDGPU_TARGETS AND NOT GPU_TARGETS)\n set(GPU_TARGETS ${AMDGPU_TARGETS})\nendif()\n"


@pytest.fixture
def legacy_tree(tmp_path):
    (tmp_path / "CMakeLists.txt").write_text(LEGACY_CMAKE)
    return tmp_path


@pytest.fixture
def curl_era_tree(tmp_path):
    (tmp_path / "CMakeLists.txt").write_text(CURL_ERA_CMAKE)
    (tmp_path / "ggml" / "src" / "ggml-hip").mkdir(parents=True)
    (tmp_path / "ggml" / "CMakeLists.txt").write_text(CURL_ERA_GGML)
    (tmp_path / "ggml" / "src" / "ggml-hip" / "CMakeLists.txt").write_text(CURL_ERA_HIP)
    (tmp_path / "examples" / "server").mkdir(parents=True)
    (tmp_path / "examples" / "server" / "CMakeLists.txt").write_text(CURL_ERA_SERVER)
    return tmp_path


LINUX = Detected(platform="linux", openssl=True)


def defines(tree_features, **req):
    det = req.pop("det", LINUX)
    rev = req.pop("rev", "b9941")
    return map_options(Request(**req), tree_features, det, rev).as_dict()


# -- the current tree (real CMake files) ----------------------------------------------------

def test_scan_vendored_tree_finds_current_switches(current_tree):
    """The vendored llama.cpp of llama-cpp-python's sdist (a real tree, not the pinned b9941)."""
    f = scan_features(current_tree)
    for name in ("GGML_NATIVE", "GGML_CUDA", "GGML_HIP", "GGML_VULKAN", "GGML_METAL", "GGML_BLAS",
                 "GGML_CPU_ALL_VARIANTS", "GGML_BACKEND_DL", "LLAMA_OPENSSL", "LLAMA_USE_PREBUILT_UI",
                 "LLAMA_BUILD_UI", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_NUMBER", "GPU_TARGETS"):
        assert f.has(name), name
    assert not f.has("LLAMA_CURL")  # declared only as "deprecated and ignored"
    assert not f.has("LLAMA_CUDA")
    assert f.ggml == "GGML"


def test_builtin_profile_for_the_lock_pin_maps_like_the_vendored_tree(current_tree):
    """--dry-run before the fetch uses the built-in profile of b9941: it must map like the
    vendored tree of the sdist (the pinned b9941 itself cannot be fetched here)."""
    scanned, builtin = scan_features(current_tree), builtin_features("b9941")
    for backend in ("cpu", "blas", "cuda", "rocm", "vulkan"):
        assert defines(scanned, backend=backend) == defines(builtin, backend=backend), backend


def test_cpu_native_current(current_tree):
    d = defines(scan_features(current_tree), backend="cpu")
    assert d["GGML_NATIVE"] == "ON"
    assert d["BUILD_SHARED_LIBS"] == "OFF"
    assert d["LLAMA_BUILD_TESTS"] == "OFF" and d["LLAMA_BUILD_EXAMPLES"] == "OFF"
    assert d["LLAMA_USE_PREBUILT_UI"] == "OFF" and d["LLAMA_BUILD_UI"] == "OFF"  # no downloads, no npm
    assert "LLAMA_BUILD_WEBUI" not in d and "LLAMA_USE_PREBUILT_WEBUI" not in d
    assert d["LLAMA_OPENSSL"] == "ON"
    assert d["LLAMA_BUILD_NUMBER"] == "9941" and d["LLAMA_BUILD_COMMIT"] == "b9941"
    assert "GGML_CUDA" not in d and "LLAMA_CURL" not in d


def test_build_commit_from_a_non_tag_rev(current_tree):
    f = scan_features(current_tree)
    d = defines(f, backend="cpu", rev="vendored-0.3.36")
    assert d["LLAMA_BUILD_COMMIT"] == "vendored-0.3.36" and "LLAMA_BUILD_NUMBER" not in d
    d = defines(f, backend="cpu", rev="0123456789abcdef0123456789abcdef01234567")
    assert d["LLAMA_BUILD_COMMIT"] == "0123456789"


def test_cpu_portable_uses_all_variants_and_dynamic_backends(current_tree):
    d = defines(scan_features(current_tree), backend="cpu", portable=True)
    assert d["GGML_NATIVE"] == "OFF"
    assert d["GGML_CPU_ALL_VARIANTS"] == "ON" and d["GGML_BACKEND_DL"] == "ON"
    assert d["BUILD_SHARED_LIBS"] == "ON"


def test_source_date_epoch_is_reported_and_native_forced(current_tree):
    m = map_options(Request(backend="cpu"), scan_features(current_tree),
                    Detected(platform="linux", source_date_epoch=True), "b9941")
    assert m.as_dict()["GGML_NATIVE"] == "ON"
    assert any("SOURCE_DATE_EPOCH" in n for n in m.notes)


def test_no_openssl_headers_turns_openssl_off(current_tree):
    d = defines(scan_features(current_tree), backend="cpu", det=Detected(platform="linux", openssl=False))
    assert d["LLAMA_OPENSSL"] == "OFF"


@pytest.mark.parametrize("backend,switch", [("cuda", "GGML_CUDA"), ("rocm", "GGML_HIP"), ("vulkan", "GGML_VULKAN"),
                                            ("blas", "GGML_BLAS")])
def test_gpu_backend_switches_current(current_tree, backend, switch):
    d = defines(scan_features(current_tree), backend=backend)
    assert d[switch] == "ON"
    others = {"GGML_CUDA", "GGML_HIP", "GGML_VULKAN", "GGML_BLAS", "GGML_METAL"} - {switch}
    assert not others & set(d)


def test_blas_vendor_openblas_on_linux_accelerate_on_macos(current_tree):
    f = scan_features(current_tree)
    assert defines(f, backend="blas", det=Detected(platform="linux", blas_vendor="OpenBLAS"))["GGML_BLAS_VENDOR"] == "OpenBLAS"
    assert defines(f, backend="blas", det=Detected(platform="darwin", blas_vendor="Apple"))["GGML_BLAS_VENDOR"] == "Apple"


def test_cuda_arch_from_flag_then_detected_then_upstream_default(current_tree):
    f = scan_features(current_tree)
    assert defines(f, backend="cuda", cuda_arch="8.6,89")["CMAKE_CUDA_ARCHITECTURES"] == "86;89"
    det = Detected(platform="linux", cuda_archs=("86", "75"))
    assert defines(f, backend="cuda", det=det)["CMAKE_CUDA_ARCHITECTURES"] == "75;86"
    assert defines(f, backend="cuda", cuda_arch="90", det=det)["CMAKE_CUDA_ARCHITECTURES"] == "90"
    m = map_options(Request(backend="cuda"), f, Detected(platform="linux"), "b9941")
    assert "CMAKE_CUDA_ARCHITECTURES" not in m.as_dict()
    assert any("upstream's default" in n for n in m.notes)


def test_rocm_gpu_targets_from_flag_or_rocminfo(current_tree):
    f = scan_features(current_tree)
    assert defines(f, backend="rocm", gpu_targets="gfx1100,gfx90a")["GPU_TARGETS"] == "gfx1100;gfx90a"
    det = Detected(platform="linux", gfx_targets=("gfx1030",))
    assert defines(f, backend="rocm", det=det)["GPU_TARGETS"] == "gfx1030"


def test_metal_on_macos_only(current_tree):
    f = scan_features(current_tree)
    d = defines(f, backend="metal", det=Detected(platform="darwin"))
    assert d["GGML_METAL"] == "ON" and d["GGML_METAL_EMBED_LIBRARY"] == "ON"
    with pytest.raises(UsageError, match="macOS"):
        defines(f, backend="metal", det=Detected(platform="linux"))


def test_legacy_names_in_cmake_args_are_translated(current_tree):
    f = scan_features(current_tree)
    m = map_options(Request(backend="cpu", cmake_args=("-DLLAMA_CUBLAS=ON", "LLAMA_NATIVE=OFF", "-DLLAMA_CURL=ON")),
                    f, LINUX, "b9941")
    d = m.as_dict()
    assert d["GGML_CUDA"] == "ON" and d["GGML_NATIVE"] == "OFF"
    assert d["LLAMA_OPENSSL"] == "ON" and "LLAMA_CURL" not in d
    assert any("LLAMA_CURL is ignored" in n for n in m.notes)
    assert "LLAMA_CUBLAS" not in d and "LLAMA_NATIVE" not in d


@pytest.mark.parametrize("bad", ["-DNOVALUE", "-D=ON", "-D1BAD=x"])
def test_bad_cmake_arg_is_a_usage_error(current_tree, bad):
    with pytest.raises(UsageError, match="--cmake-arg"):
        translate_arg(bad, scan_features(current_tree))


def test_unknown_backend_is_a_usage_error(current_tree):
    with pytest.raises(UsageError, match="unknown backend"):
        defines(scan_features(current_tree), backend="opencl")


# -- older versions (synthetic CMake files with the names those releases declared) ---------

def test_legacy_tree_uses_llama_prefixed_switches(legacy_tree):
    f = scan_features(legacy_tree)
    assert f.ggml == "LLAMA"
    d = defines(f, backend="cuda", rev="b2900")
    assert d["LLAMA_CUDA"] == "ON" and d["LLAMA_NATIVE"] == "ON"
    assert d["LLAMA_CURL"] == "OFF"  # libcurl-dev not needed: pylmserv fetches models
    assert "GGML_CUDA" not in d and "GGML_NATIVE" not in d and "LLAMA_OPENSSL" not in d
    assert defines(f, backend="rocm", rev="b2900")["LLAMA_HIPBLAS"] == "ON"
    assert defines(f, backend="rocm", gpu_targets="gfx1100", rev="b2900")["AMDGPU_TARGETS"] == "gfx1100"
    assert defines(f, backend="vulkan", rev="b2900")["LLAMA_VULKAN"] == "ON"


def test_legacy_tree_keeps_legacy_cmake_args(legacy_tree):
    m = map_options(Request(cmake_args=("-DLLAMA_CUDA=ON",)), scan_features(legacy_tree), LINUX, "b2900")
    assert m.as_dict()["LLAMA_CUDA"] == "ON" and "GGML_CUDA" not in m.as_dict()


def test_legacy_portable_has_no_variants(legacy_tree):
    m = map_options(Request(portable=True), scan_features(legacy_tree), LINUX, "b2900")
    d = m.as_dict()
    assert d["LLAMA_NATIVE"] == "OFF" and "GGML_CPU_ALL_VARIANTS" not in d and d["BUILD_SHARED_LIBS"] == "OFF"
    assert any("GGML_CPU_ALL_VARIANTS" in n for n in m.notes)


def test_curl_era_tree(curl_era_tree):
    f = scan_features(curl_era_tree)
    assert f.ggml == "GGML" and f.has("LLAMA_CURL") and not f.has("LLAMA_OPENSSL")
    d = defines(f, backend="rocm", gpu_targets="gfx1100", rev="b5000")
    assert d["GGML_HIP"] == "ON" and d["GPU_TARGETS"] == "gfx1100"
    assert d["LLAMA_CURL"] == "OFF" and "LLAMA_OPENSSL" not in d
    m = map_options(Request(cmake_args=("-DLLAMA_CURL=ON",)), f, LINUX, "b5000")
    assert m.as_dict()["LLAMA_CURL"] == "ON"  # still a real switch in this version: kept


def test_builtin_profiles_by_release_number():
    assert builtin_features("b2000").ggml == "LLAMA"
    assert builtin_features("b5000").has("LLAMA_CURL")
    assert builtin_features("b9941").has("LLAMA_OPENSSL")


def test_not_a_llama_tree(tmp_path):
    with pytest.raises(UsageError, match="not a llama.cpp source tree"):
        scan_features(tmp_path)


# -- commands ----------------------------------------------------------------------------------

def test_commands_every_define_visible_and_ccache_launchers(current_tree, tmp_path):
    f = scan_features(current_tree)
    m = map_options(Request(backend="cuda", cuda_arch="86"), f, LINUX, "b9941")
    cmds = make_commands("cmake", "/usr/bin/ninja", current_tree, tmp_path / "b", m, ("llama-cli", "llama-server"),
                         2, "/usr/bin/ccache", "cuda")
    conf, build = cmds.lines()
    for k, v in m.defines:
        assert f"-D{k}={v}" in conf
    for lang in ("C", "CXX", "CUDA"):
        assert f"-DCMAKE_{lang}_COMPILER_LAUNCHER=/usr/bin/ccache" in conf
    assert "-G Ninja" in conf
    assert build.endswith("--target llama-cli llama-server -j 2")
    assert "make" not in build.split()


def test_commands_without_ninja_or_ccache(current_tree, tmp_path):
    m = map_options(Request(), scan_features(current_tree), LINUX, "b9941")
    cmds = make_commands("cmake", None, current_tree, tmp_path / "b", m, ("llama-cli",), None, None, "cpu")
    assert "-G" not in cmds.configure and not any("LAUNCHER" in a for a in cmds.configure)
