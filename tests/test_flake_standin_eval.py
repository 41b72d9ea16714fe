"""Stand-in based: the flake's stdenv outputs evaluated against tests/nixpkgs-standin.

nixpkgs cannot be fetched here, so `--override-input nixpkgs path:<stand-in>` replaces it
with a stand-in of its interface on nixpkgs' real `lib` (callPackage, stdenv.mkDerivation,
cudaPackages' split outputs, rocmPackages, python3Packages, mkShell, symlinkJoin, and
fetchFromGitHub/fetchzip/fetchgit as fixed-output derivations; unfree and platform
checks like check-meta). Nothing here is built: the tests assert what each output
*would* build with (CMake flags per backend, CUDA/HIP architectures, link lines, src =
the locked FOD, no stripping for cosmo binaries, the cosmocc pre-seed) and that every
derivation instantiates. The real pins of pylmserv.lock are used where no fetch is
needed (they point at github.com and huggingface.co, unreachable here: evaluating the
stdenv outputs at all shows that no source is fetched at evaluation time); a lock served
on 127.0.0.1 where instantiation must fetch the sources.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from pylmserv.core.hashing import Hash
from tests.support import flakeworld as fw
from tests.support.nixenv import have_nix, nix_env
from tests.support.tools import missing, require  # noqa: F401

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.nix


def standin_eval(flake, attr, apply):
    proc = fw.nix("nix", "eval", "--json", *fw.override_nixpkgs(), f"path:{flake}#{attr}", "--apply", apply)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def standin_error(flake, attr, apply="x: x"):
    proc = fw.nix("nix", "eval", "--json", *fw.override_nixpkgs(), f"path:{flake}#{attr}", "--apply", apply)
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


@pytest.fixture(scope="module")
def nix_module():
    if not have_nix():
        missing("real Nix", "apt-get install nix-bin; scripts/setup-dev.sh installs it")
    patch = pytest.MonkeyPatch()
    for key, value in nix_env().items():
        patch.setenv(key, value)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def repo_flake(nix_module, tmp_path_factory):
    """The flake with the repository's real pylmserv.lock (published pins)."""
    flake = fw.copy_flake(tmp_path_factory.mktemp("repo") / "flake")
    shutil.copy2(fw.REPO / "pylmserv.lock", flake / "pylmserv.lock")
    return flake


@pytest.fixture
def own_flake(nix, tmp_path):
    """A private copy (for tests that edit files)."""
    flake = fw.copy_flake(tmp_path / "flake")
    shutil.copy2(fw.REPO / "pylmserv.lock", flake / "pylmserv.lock")
    return flake


@pytest.fixture(scope="module")
def real_lock():
    return tomllib.loads((fw.REPO / "pylmserv.lock").read_text())


PACKAGES = r"""
ps: let
  x = ps.x86_64-linux; a = ps.aarch64-linux; d = ps.aarch64-darwin; xd = ps.x86_64-darwin;
  names = l: map (i: i.name) l;
  src = p: { inherit (p.src) name outputHash outputHashMode; url = p.src.url; path = p.src.outPath;
             builder = p.src.builder; lockName = p.src.lockName or null; };
  llama = p: { flags = p.cmakeFlags; inputs = names (p.nativeBuildInputs ++ p.buildInputs); native = names p.nativeBuildInputs;
               inherit (p) stdenv backend pname version env; src = src p; description = p.meta.description;
               webUi = p.webUi; };
  withPrefix = pre: set: builtins.filter (n: builtins.match "${pre}.*" n != null) (builtins.attrNames set);
in {
  llama = builtins.mapAttrs (_: llama) {
    cpu = x.llama-cpp; cuda = x.llama-cpp-cuda; rocm = x.llama-cpp-rocm; vulkan = x.llama-cpp-vulkan;
    metal = d.llama-cpp; aarch64-cpu = a.llama-cpp; aarch64-cuda = a.llama-cpp-cuda; x86_64-darwin = xd.llama-cpp;
  };
  cudaOverride = (x.llama-cpp-cuda.override { cudaCapabilities = [ "8.6" "8.9" ]; }).cmakeFlags;
  nixpkgsNames = {
    cuda = (x.llama-cpp.override { cudaSupport = true; }).cmakeFlags;
    rocm = (x.llama-cpp.override { rocmSupport = true; }).cmakeFlags;
    cudaLlamafile = (x.llamafile.override { cudaSupport = true; }).pname;
  };
  rocmOverride = (x.llama-cpp-rocm.override { rocmGpuTargets = "gfx1100"; }).cmakeFlags;
  cosmocc = { inherit (x.cosmocc) dontStrip dontPatchELF dontFixup dontPatchShebangs version installPhase;
              src = src x.cosmocc; srcPath = x.cosmocc.src.outPath; inputs = names x.cosmocc.nativeBuildInputs;
              licenses = map (l: l.spdxId or l.shortName) x.cosmocc.meta.license;
              provenance = map (s: s.shortName) x.cosmocc.meta.sourceProvenance; };
  cosmoccs = map (n: { name = n; inherit (x.${n}) version; hash = x.${n}.src.outputHash; }) (withPrefix "cosmocc-" x);
  llamafile = { inherit (x.llamafile) dontStrip dontPatchELF postPatch preBuild cosmoccSeed makeFlags version pname;
                cosmocc = x.llamafile.cosmocc.outPath; cosmoccPath = x.cosmocc.outPath; src = src x.llamafile; };
  llamafileCuda = { inherit (x.llamafile-cuda) postBuild postInstall nvccFlags linkFlags zipArgs stdenv dontStrip pname;
                    inputs = names (x.llamafile-cuda.nativeBuildInputs ++ x.llamafile-cuda.buildInputs); };
  pylmserv = { inherit (x.pylmserv) pname version doCheck disabledTestMarks;
               deps = names x.pylmserv.propagatedBuildInputs; same = x.default.drvPath == x.pylmserv.drvPath; };
  models = builtins.listToAttrs (map (n: { name = n; value = { inherit (x.${n}) name outputHash outputHashMode url system builder; path = x.${n}.outPath; }; })
    (withPrefix "model-" x));
}
"""


@pytest.fixture(scope="module")
def packages(repo_flake):
    return standin_eval(repo_flake, "packages", PACKAGES)


def _flag(flags, name):
    hits = [f for f in flags if f.startswith(f"-D{name}:")]
    assert len(hits) == 1, (name, flags)
    return hits[0].split("=", 1)[1]


def test_outputs_per_system(repo_flake, real_lock):
    got = standin_eval(repo_flake, "packages", "ps: builtins.mapAttrs (_: builtins.attrNames) ps")
    models = {f"model-{n}" for n in real_lock["models"]}
    sources = {f"source-{n}" for n in real_lock["sources"]}
    common = {"default", "pylmserv", "llama-cpp"} | models | sources
    linux = {"cosmocc", "llamafile"}  # linux until a darwin build has been seen (issue 18)
    assert set(got) == {"x86_64-linux", "aarch64-linux", "x86_64-darwin", "aarch64-darwin"}
    assert set(got["x86_64-linux"]) >= common | linux | {"llama-cpp-cuda", "llama-cpp-rocm", "llama-cpp-vulkan",
                                                         "llamafile-cuda"}
    assert set(got["aarch64-linux"]) >= common | linux | {"llama-cpp-cuda", "llama-cpp-vulkan"}
    assert not {"llama-cpp-rocm", "llamafile-cuda"} & set(got["aarch64-linux"])
    for darwin in ("aarch64-darwin", "x86_64-darwin"):
        assert set(got[darwin]) >= common
        assert not {"llama-cpp-cuda", "llama-cpp-rocm", "llama-cpp-vulkan", "llamafile-cuda"} & set(got[darwin])
        assert not linux & set(got[darwin]) and not [n for n in got[darwin] if n.startswith("cosmocc")]


def test_llama_cpp_cmake_flags_per_backend(packages, real_lock):
    llama = packages["llama"]
    expect = {  # backend -> the GGML_* switch that must be on
        "cpu": "GGML_BLAS", "cuda": "GGML_CUDA", "rocm": "GGML_HIP", "vulkan": "GGML_VULKAN", "metal": "GGML_METAL",
        "aarch64-cpu": "GGML_BLAS", "aarch64-cuda": "GGML_CUDA", "x86_64-darwin": "GGML_BLAS",
    }
    switches = ("GGML_BLAS", "GGML_CUDA", "GGML_HIP", "GGML_VULKAN", "GGML_METAL")
    for variant, on in expect.items():
        flags = llama[variant]["flags"]
        for switch in switches:
            assert _flag(flags, switch) == ("TRUE" if switch == on else "FALSE"), (variant, switch)
        # Portable, and nothing downloaded at build time (no prebuilt UI from a bucket).
        assert _flag(flags, "GGML_NATIVE") == "FALSE"
        assert _flag(flags, "LLAMA_BUILD_TESTS") == "FALSE"
        assert _flag(flags, "LLAMA_USE_PREBUILT_UI") == "FALSE"
        assert _flag(flags, "LLAMA_BUILD_UI") == "FALSE"
        assert _flag(flags, "LLAMA_BUILD_SERVER") == "TRUE"
        assert llama[variant]["version"] == real_lock["sources"]["llama-cpp"]["rev"]
        # The web UI's absence is stated, not silent.
        assert llama[variant]["webUi"] is False and "no web UI" in llama[variant]["description"]

    assert llama["cpu"]["backend"] == "blas" and "blas" in llama["cpu"]["inputs"]
    assert llama["metal"]["backend"] == "metal"
    assert _flag(llama["metal"]["flags"], "GGML_METAL_EMBED_LIBRARY") == "TRUE"


def test_cpu_builds_load_the_best_cpu_variant_at_run_time(packages):
    """Defect 9: GGML_NATIVE=OFF alone builds for a baseline CPU (no AVX2/FMA/F16C).
    ggml's CPU variants are loadable modules; ggml refuses ALL_VARIANTS for ARM outside
    Linux (FATAL_ERROR), so aarch64-darwin builds the one native-less variant."""
    llama = packages["llama"]
    for variant in ("cpu", "cuda", "rocm", "vulkan", "aarch64-cpu", "aarch64-cuda", "x86_64-darwin"):
        flags = llama[variant]["flags"]
        assert _flag(flags, "GGML_BACKEND_DL") == "TRUE", variant
        assert _flag(flags, "GGML_CPU_ALL_VARIANTS") == "TRUE", variant
        assert _flag(flags, "BUILD_SHARED_LIBS") == "TRUE", variant  # GGML_BACKEND_DL requires it
        backend_dir = _flag(flags, "GGML_BACKEND_DIR")
        assert backend_dir.endswith("/lib") and not backend_dir.startswith("/nix/store"), backend_dir  # $out placeholder
    assert _flag(llama["metal"]["flags"], "GGML_CPU_ALL_VARIANTS") == "FALSE"


def test_version_reports_the_locked_build_number_and_commit(packages, real_lock):
    rev = real_lock["sources"]["llama-cpp"]["rev"]
    for variant in ("cpu", "cuda", "metal"):
        flags = packages["llama"][variant]["flags"]
        assert _flag(flags, "LLAMA_BUILD_NUMBER") == rev.lstrip("b")
        assert _flag(flags, "LLAMA_BUILD_COMMIT") == real_lock["sources"]["llama-cpp"].get("commit", rev)


def test_nixpkgs_names_cuda_support_and_rocm_support_work(packages):
    """Defect 10: `.override { cudaSupport = true; }` (nixpkgs' name) turns CUDA on."""
    assert _flag(packages["nixpkgsNames"]["cuda"], "GGML_CUDA") == "TRUE"
    assert _flag(packages["nixpkgsNames"]["rocm"], "GGML_HIP") == "TRUE"
    assert packages["nixpkgsNames"]["cudaLlamafile"] == "llamafile-cuda"


def test_cuda_build_uses_backend_stdenv_driver_runpath_and_arch_string(packages):
    cuda = packages["llama"]["cuda"]
    assert cuda["stdenv"] == "cuda-backendStdenv-x86_64-linux"
    assert packages["llama"]["cpu"]["stdenv"] == "stdenv-x86_64-linux"
    assert "auto-add-driver-runpath-hook" in cuda["inputs"]
    assert {"cudaPackages-cuda_nvcc-12.8", "cudaPackages-libcublas-12.8", "cudaPackages-cuda_cccl-12.8"} <= set(cuda["inputs"])
    # nixpkgs' default capabilities (the stand-in's list), dots dropped, ";"-joined.
    assert _flag(cuda["flags"], "CMAKE_CUDA_ARCHITECTURES") == "75;80;86;89;90;100;120"
    assert _flag(packages["cudaOverride"], "CMAKE_CUDA_ARCHITECTURES") == "86;89"
    assert "CMAKE_CUDA_ARCHITECTURES" not in " ".join(packages["llama"]["cpu"]["flags"])


def test_rocm_build_sets_hip_architectures_and_env(packages):
    rocm = packages["llama"]["rocm"]
    archs = _flag(rocm["flags"], "CMAKE_HIP_ARCHITECTURES")
    assert archs.split(";")[:2] == ["gfx900", "gfx906"] and "gfx1100" in archs.split(";")
    assert _flag(rocm["flags"], "CMAKE_HIP_COMPILER").endswith("-rocmPackages-clang/bin/clang++")  # clr.hipClangPath
    assert rocm["env"]["ROCM_PATH"].endswith("-rocmPackages-clr")
    assert rocm["env"]["HIP_DEVICE_LIB_PATH"].endswith("-rocmPackages-rocm-device-libs/amdgcn/bitcode")
    assert _flag(packages["rocmOverride"], "CMAKE_HIP_ARCHITECTURES") == "gfx1100"
    assert {"rocmPackages-clr", "rocmPackages-hipblas", "rocmPackages-rocblas"} <= set(rocm["inputs"])


def test_vulkan_build_has_spirv_headers(packages):
    """Defect 2: ggml-vulkan's CMakeLists needs find_package(SPIRV-Headers CONFIG)
    (tests/test_flake_upstream.py checks every find_package against these inputs)."""
    assert {"vulkan-headers", "vulkan-loader", "shaderc", "spirv-headers"} <= set(packages["llama"]["vulkan"]["inputs"])
    assert "shaderc" in packages["llama"]["vulkan"]["native"]  # glslc runs at build time


def test_every_stdenv_package_takes_src_from_the_lock_at_build_time(packages, real_lock):
    """Defect 4: the stdenv outputs' source is nixpkgs' fetchFromGitHub, a fixed-output
    derivation fetched at build time (substitutable), on the store path of the pin."""
    pins = real_lock["sources"]
    llama_path = fw.fixed_path(Hash.parse(pins["llama-cpp"]["hash"]), "source", recursive=True)
    for variant in ("cpu", "cuda", "rocm", "vulkan", "metal"):
        src = packages["llama"][variant]["src"]
        assert src["name"] == "source" and src["outputHashMode"] == "recursive"
        assert src["outputHash"] == pins["llama-cpp"]["hash"]
        assert src["url"] == pins["llama-cpp"]["url"]  # fetchFromGitHub's URL is the lock's
        assert src["path"] == llama_path
        assert src["builder"] != "builtin:fetchurl"  # a real fetcher, not an eval-time wrapper
    lf = packages["llamafile"]["src"]
    assert (lf["outputHash"], lf["url"]) == (pins["llamafile"]["hash"], pins["llamafile"]["url"])
    assert lf["path"] == fw.fixed_path(Hash.parse(pins["llamafile"]["hash"]), "source", recursive=True)
    cosmocc_pin = pins["cosmocc-" + pins["llamafile"]["cosmocc"].replace(".", "_")]
    assert packages["cosmocc"]["src"]["outputHash"] == cosmocc_pin["hash"]
    assert packages["cosmocc"]["src"]["outputHashMode"] == "flat"
    # The zip is a flat FOD on exactly the path nixpkgs' fetchurl would give it.
    assert packages["cosmocc"]["srcPath"] == fw.fixed_path(Hash.parse(cosmocc_pin["hash"]),
                                                           cosmocc_pin["url"].rsplit("/", 1)[-1], recursive=False)
    assert {c["name"]: c["hash"] for c in packages["cosmoccs"]} == {
        name: pin["hash"] for name, pin in pins.items() if name.startswith("cosmocc-")}


def test_stdenv_outputs_evaluate_under_restricted_eval(repo_flake):
    """Hydra's restricted evaluation: no network, no paths outside the flake. Every
    stdenv output instantiates (its sources are build-time FODs)."""
    proc = fw.nix("nix", "eval", "--json", "--option", "restrict-eval", "true", *fw.override_nixpkgs(),
                  f"path:{repo_flake}#packages.x86_64-linux", "--apply",
                  "x: map (n: x.${n}.drvPath) [ \"llama-cpp\" \"llama-cpp-cuda\" \"llama-cpp-rocm\" "
                  "\"llama-cpp-vulkan\" \"llamafile\" \"llamafile-cuda\" \"cosmocc\" ]")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 7


def test_models_are_builtin_fetchurl_fods_on_fetchurl_paths(packages, real_lock):
    got = packages["models"]
    assert set(got) == {f"model-{n}" for n in real_lock["models"]}
    for name, pin in real_lock["models"].items():
        model = got[f"model-{name}"]
        assert model["builder"] == "builtin:fetchurl" and model["system"] == "builtin"
        assert (model["url"], model["outputHash"], model["outputHashMode"]) == (pin["url"], pin["hash"], "flat")
        assert model["name"] == pin["file"]
        assert model["path"] == fw.fixed_path(Hash.parse(pin["hash"]), pin["file"], recursive=False)


def test_cosmo_binaries_are_never_stripped_and_cosmocc_is_pre_seeded(packages, real_lock):
    cosmocc = packages["cosmocc"]
    assert cosmocc["dontStrip"] and cosmocc["dontPatchELF"] and cosmocc["dontFixup"] and cosmocc["dontPatchShebangs"]
    assert "unzip" in cosmocc["inputs"] and "unzip -q $src -d $out" in cosmocc["installPhase"]
    assert "chmod a+x" in cosmocc["installPhase"]

    version = real_lock["sources"]["llamafile"]["cosmocc"]
    lf = packages["llamafile"]
    assert lf["dontStrip"] and lf["dontPatchELF"]
    assert lf["cosmoccSeed"] == f".cosmocc/{version}"
    assert lf["cosmocc"] == lf["cosmoccPath"]  # the flake's cosmocc package, not another
    assert f"ln -s {lf['cosmoccPath']} .cosmocc/{version}\n" in lf["postPatch"]  # lib.escapeShellArg leaves it bare
    assert "export HOME=$TMPDIR" in lf["preBuild"]
    assert lf["version"] == real_lock["sources"]["llamafile"]["rev"]
    assert any(f.startswith("PREFIX=/") for f in lf["makeFlags"])


def test_cosmocc_meta_names_the_gpl_toolchain_and_binary_provenance(packages):
    """Defect 10: the release zip is a prebuilt GCC toolchain plus Cosmopolitan libc."""
    assert {"ISC", "GPL-3.0-or-later"} <= set(packages["cosmocc"]["licenses"])
    assert packages["cosmocc"]["provenance"] == ["binaryNativeCode"]


def test_llamafile_cuda_links_libcuda_from_the_driver_stub_and_prefers_the_embedded_module(packages):
    """Defect 1: ggml-cuda.cu calls the CUDA driver API; llamafile's cuda.sh links -lcuda.
    The stub is nixpkgs' cuda_cudart `stubs` output (tests/test_flake_cuda_link.py links
    a probe with these exact flags using the real nvcc)."""
    got = packages["llamafileCuda"]
    assert got["pname"] == "llamafile-cuda" and got["dontStrip"]
    assert got["stdenv"] == "cuda-backendStdenv-x86_64-linux"
    assert "cudaPackages-cuda_nvcc-12.8" in got["inputs"]
    assert "-gencode=arch=compute_89,code=sm_89" in got["nvccFlags"]
    assert "-march=native" not in " ".join(got["nvccFlags"])
    assert "--linker-options=-rpath,/run/opengl-driver/lib" in got["nvccFlags"]
    stubs, lcuda = got["linkFlags"]
    assert lcuda == "-lcuda"
    assert stubs.startswith("-L/nix/store/") and stubs.endswith("-cudaPackages-cuda_cudart-12.8-stubs/lib/stubs")
    assert "-lcublas" not in got["linkFlags"]  # tinyBLAS
    assert f"-o ggml-cuda.so ggml-cuda.cu {stubs} -lcuda)" in got["postBuild"]
    # The embedded module first: --nocompile in the zip's .args, then the user's args.
    assert got["zipArgs"] == ["--nocompile", "..."]
    assert "zipalign -j0 $out/bin/llamafile ggml-cuda.so .args" in got["postInstall"]


def test_pylmserv_package_takes_its_dependencies_from_pyproject(packages):
    got = packages["pylmserv"]
    pyproject = tomllib.loads((fw.REPO / "pyproject.toml").read_text())
    assert got["pname"] == "pylmserv" and got["version"] == pyproject["project"]["version"]
    assert got["same"], "packages.default is pylmserv"
    wanted = {d.split(">")[0].split("=")[0].split(";")[0].split("<")[0].strip().lower()
              for d in pyproject["project"]["dependencies"] if "python_version < '3.11'" not in d}
    assert {d.split("-", 1)[1] for d in got["deps"]} == wanted  # stand-in python is 3.13: no tomli
    assert got["doCheck"] is False


def test_pylmserv_source_leaves_out_readme_and_nix(own_flake):
    """Defect 10: README/docs/nix edits must not rebuild the Python package; code edits must."""
    def drv():
        return standin_eval(own_flake, "packages.x86_64-linux.pylmserv", "p: p.drvPath")

    before = drv()
    (own_flake / "README.md").write_text("edited\n")
    (own_flake / "docs").mkdir()
    (own_flake / "docs" / "nix.md").write_text("edited\n")
    (own_flake / "nix" / "cosmocc.nix").write_text((own_flake / "nix" / "cosmocc.nix").read_text() + "\n# edited\n")
    assert drv() == before
    (own_flake / "pylmserv" / "__init__.py").write_text((own_flake / "pylmserv" / "__init__.py").read_text() + "\n# edited\n")
    assert drv() != before


def test_check_has_the_tools_the_offline_tests_run(repo_flake):
    """Defect 6: the sandboxed test run needs git, zip, unzip, cmake and ninja; every
    program the tests start by name must be there (or come with stdenv)."""
    import re

    inputs = set(standin_eval(repo_flake, "checks.x86_64-linux.pylmserv-tests",
                              "c: map (p: p.pname or p.name) c.nativeCheckInputs"))
    started = set()
    for path in (fw.REPO / "tests").rglob("*.py"):
        text = path.read_text()
        started |= set(re.findall(r"""\[\s*["'](git|zip|unzip|cmake|ninja|tar|make|gcc|cc)["']\s*,""", text))
        started |= set(re.findall(r"""which\(\s*["'](git|zip|unzip|cmake|ninja|tar|make|gcc|cc)["']""", text))
    from_stdenv = {"tar", "make", "gcc", "cc"}
    assert started - from_stdenv, "the scan found no tools: it is broken"
    missing = started - from_stdenv - inputs
    assert not missing, f"tests run {sorted(missing)}, which checks.pylmserv-tests lacks"
    assert {"git", "zip", "unzip", "cmake", "ninja"} <= inputs


def test_dev_shells_apps_checks_and_overlay(repo_flake):
    shells = standin_eval(repo_flake, "devShells", r"""
      ds: let names = l: map (p: p.name) l; x = ds.x86_64-linux; in {
        systems = builtins.mapAttrs (_: builtins.attrNames) ds;
        default = names x.default.nativeBuildInputs;
        defaultBuild = names x.default.buildInputs;
        python = names (builtins.head x.default.nativeBuildInputs).packages;
        cuda = names (x.cuda.nativeBuildInputs ++ x.cuda.buildInputs);
        cudaStdenv = x.cuda.shellStdenv; defaultStdenv = x.default.shellStdenv;
        cudaPath = x.cuda.CUDA_PATH; cudaRoot = x.cuda.cudaRoot.outPath;
        rocm = names (x.rocm.nativeBuildInputs ++ x.rocm.buildInputs);
        rocmPath = x.rocm.ROCM_PATH; hipDeviceLibs = x.rocm.HIP_DEVICE_LIB_PATH;
        gpuVars = map (s: { cuda = s ? CUDA_PATH; rocm = s ? ROCM_PATH; }) [ x.default x.cuda x.rocm ];
        cudaRootPostBuild = builtins.elemAt x.cuda.cudaRoot.drvAttrs.args 1;
        darwinDefault = names ds.aarch64-darwin.default.nativeBuildInputs;
        hook = x.default.shellHook;
      }""")
    assert shells["systems"] == {"x86_64-linux": ["cuda", "default", "rocm"], "aarch64-linux": ["cuda", "default"],
                                 "x86_64-darwin": ["default"], "aarch64-darwin": ["default"]}
    for tool in ("cmake", "ninja", "ccache", "git", "unzip", "nix-prefetch-git", "cosmocc-3.3.6", "pkg-config"):
        assert tool in shells["default"], tool
    assert {"blas", "openssl"} <= set(shells["defaultBuild"])  # inputsFrom the CPU llama-cpp
    assert shells["default"][0].startswith("python3-") and shells["default"][0].endswith("-env")
    assert {"python3.13-click", "python3.13-requests", "python3.13-pytest", "python3.13-gguf",
            "python3.13-pip", "python3.13-setuptools"} <= set(shells["python"])
    # Defect 7: one CUDA root, the backend stdenv, the cuda llama-cpp's inputs.
    assert "cudaPackages-cuda_nvcc-12.8" in shells["cuda"] and "cudaPackages-libcublas-12.8" in shells["cuda"]
    assert shells["cudaPath"] == shells["cudaRoot"] and shells["cudaPath"].endswith("-cuda-merged-12.8")
    assert shells["cudaStdenv"] == "cuda-backendStdenv-x86_64-linux"
    assert shells["defaultStdenv"] == "stdenv-x86_64-linux"
    assert "rocmPackages-clr" in shells["rocm"] and shells["rocmPath"].endswith("-rocmPackages-clr")
    assert shells["hipDeviceLibs"].endswith("-rocmPackages-rocm-device-libs/amdgcn/bitcode")
    # only the backend's own shell sets its variables (no empty CUDA_PATH elsewhere)
    assert shells["gpuVars"] == [{"cuda": False, "rocm": False}, {"cuda": True, "rocm": False},
                                 {"cuda": False, "rocm": True}]
    assert 'rm -f "$out/lib/libcuda.so" "$out/lib/libcuda.so.1"' in shells["cudaRootPostBuild"]
    assert not [n for n in shells["darwinDefault"] if n.startswith("cosmocc")]
    # No shell function with PYTHONPATH=$PWD: an installed (editable) entry point.
    assert "PYTHONPATH" not in shells["hook"] and "pylmserv()" not in shells["hook"]
    assert "pip install" in shells["hook"] and " -e " in shells["hook"]

    apps = standin_eval(repo_flake, "apps", "a: builtins.mapAttrs (_: s: builtins.mapAttrs (_: x: x.type) s) a")
    assert apps["x86_64-linux"] == {"default": "app", "pylmserv": "app", "llama-server": "app"}
    described = standin_eval(repo_flake, "apps.x86_64-linux", "a: builtins.mapAttrs (_: x: x.meta.description or null) a")
    assert all(described.values()), described

    checks = standin_eval(repo_flake, "checks", "c: builtins.mapAttrs (_: s: builtins.mapAttrs (_: t: t.doCheck) s) c")
    assert checks["x86_64-linux"] == {"pylmserv-tests": True}
    assert standin_eval(repo_flake, "overlays", "o: builtins.isFunction o.default") is True


def test_standin_refuses_unfree_cuda_like_nixpkgs(nix):
    """The stand-in is not a pushover: CUDA without allowUnfree fails, so the flake's
    passing CUDA evaluation above shows it really asks for allowUnfree."""
    proc = fw.nix("nix", "eval", "--raw", f"path:{fw.standin()}#legacyPackages.x86_64-linux.cudaPackages.cuda_nvcc.name")
    assert proc.returncode != 0 and "unfree" in proc.stderr


# -- defect 11: names and versions from the lock -----------------------------------------

EVERYTHING = "x: [ (builtins.attrNames x) x.llamafile.drvPath x.llama-cpp.drvPath x.cosmocc-3_9_7.drvPath ]"


@pytest.mark.parametrize("old, new, message", [
    ("[models.stories15m]", '[models."stories.15m"]', 'pylmserv.lock: [models."stories.15m"] is not a valid name'),
    ("[models.stories15m]", '[models."a b"]', 'pylmserv.lock: [models."a b"] is not a valid name'),
    ('cosmocc = "3.3.6"', 'cosmocc = "3.3.6$(touch /tmp/pwned)"',
     'pylmserv.lock: [sources.llamafile] has cosmocc = "3.3.6$(touch /tmp/pwned)", which is not a plain version'),
    ('version = "3.9.7"', 'version = "3.9.7 x"', 'pylmserv.lock: [sources.cosmocc-3_9_7] has version/rev "3.9.7 x"'),
    ('rev = "b9941"', 'rev = "b9941 ; echo"', 'pylmserv.lock: [sources.llama-cpp] has version/rev "b9941 ; echo"'),
], ids=["dot", "space", "cosmocc-version-shell", "toolchain-version", "rev-space"])
def test_lock_names_and_versions_are_validated(own_flake, old, new, message):
    """Defect 11: names become attributes and store names, versions go into phases."""
    lock = own_flake / "pylmserv.lock"
    text = lock.read_text()
    assert old in text
    lock.write_text(text.replace(old, new, 1))
    err = standin_error(own_flake, "packages.x86_64-linux", EVERYTHING)
    assert message in err, err


def test_the_validation_does_not_refuse_the_real_lock(repo_flake):
    assert len(standin_eval(repo_flake, "packages.x86_64-linux", EVERYTHING)) == 4


def test_unknown_fetcher_in_the_lock_is_a_clear_error(own_flake):
    lock = own_flake / "pylmserv.lock"
    lock.write_text(lock.read_text().replace("[sources.llama-cpp]\n", '[sources.llama-cpp]\nfetcher = "curl"\n', 1))
    err = standin_error(own_flake, "packages.x86_64-linux.llama-cpp", "p: p.drvPath")
    assert 'pylmserv.lock: [sources.llama-cpp] has fetcher = "curl"' in err and "fetchFromGitHub" in err


# -- with a lock served on 127.0.0.1: instantiate everything (this fetches the sources) --

@pytest.fixture
def world(nix, tmp_path, http_dir):
    root, base = http_dir
    return fw.build_world(tmp_path, root, base)


def test_every_output_instantiates_with_src_the_locked_fod(world):
    got = standin_eval(world.flake, "packages", r"""
      ps: let x = ps.x86_64-linux; in {
        drvs = builtins.mapAttrs (_: p: p.drvPath) {
          inherit (x) llama-cpp llama-cpp-cuda llama-cpp-rocm llama-cpp-vulkan cosmocc llamafile llamafile-cuda pylmserv;
          darwin-llama-cpp = ps.aarch64-darwin.llama-cpp; aarch64-llama-cpp-cuda = ps.aarch64-linux.llama-cpp-cuda;
        };
        llamaSrc = x.llama-cpp.src.outPath; llamaSrcDrv = x.llama-cpp.src.drvPath;
        llamafileSrc = x.llamafile.src.outPath;
      }""")
    pins = world.lock.sources
    assert got["llamaSrc"] == fw.fixed_path(pins["llama-cpp"].hash, "source", recursive=True)
    assert got["llamafileSrc"] == fw.fixed_path(pins["llamafile"].hash, "source", recursive=True)

    show = fw.nix("nix", "show-derivation", got["drvs"]["llama-cpp"], got["drvs"]["llama-cpp-cuda"])
    assert show.returncode == 0, show.stderr
    drvs = json.loads(show.stdout)
    cpu, cuda = drvs[got["drvs"]["llama-cpp"]], drvs[got["drvs"]["llama-cpp-cuda"]]
    for drv in (cpu, cuda):
        assert got["llamaSrcDrv"] in drv["inputDrvs"]
        assert drv["env"]["src"] == got["llamaSrc"]
        assert "-DGGML_NATIVE:BOOL=FALSE" in drv["env"]["cmakeFlags"].split(" ")
    assert "-DGGML_CUDA:BOOL=TRUE" in cuda["env"]["cmakeFlags"].split(" ")

    # `nix build .#source-llama-cpp` (builtin fetchers) lands exactly on the package's src.
    built = fw.nix("nix", "build", "--no-link", "--json", *fw.override_nixpkgs(), f"path:{world.flake}#source-llama-cpp")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)[0]["outputs"]["out"] == got["llamaSrc"]

    apps = standin_eval(world.flake, "apps", "a: builtins.mapAttrs (_: x: x.program) a.x86_64-linux")
    llama_out = standin_eval(world.flake, "packages", "ps: ps.x86_64-linux.llama-cpp.outPath")
    assert apps["llama-server"] == f"{llama_out}/bin/llama-server"
    assert apps["pylmserv"].endswith("/bin/pylmserv")


def test_missing_cosmocc_pin_is_a_clear_evaluation_error(world):
    text = (world.flake / "pylmserv.lock").read_text().replace('cosmocc = "3.3.6"', 'cosmocc = "9.9.9"')
    (world.flake / "pylmserv.lock").write_text(text)
    proc = fw.nix("nix", "eval", "--raw", *fw.override_nixpkgs(),
                  f"path:{world.flake}#packages.x86_64-linux.llamafile.drvPath")
    assert proc.returncode != 0
    assert 'no [sources.cosmocc-*] with version = "9.9.9"' in proc.stderr


def test_nix_flake_check_evaluates_every_output(world):
    """`nix flake check --no-build`: schema of every output (apps, overlays, devShells,
    checks) and instantiation of every derivation, against the stand-in."""
    proc = fw.nix("nix", "flake", "check", "--no-build", *fw.override_nixpkgs(), f"path:{world.flake}")
    assert proc.returncode == 0, proc.stderr
