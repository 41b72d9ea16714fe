"""Stand-in based: the flake's stdenv outputs evaluated against tests/nixpkgs-standin.

nixpkgs cannot be fetched here, so `--override-input nixpkgs path:tests/nixpkgs-standin`
replaces it with a small stand-in of its interface (callPackage, stdenv.mkDerivation,
lib, cudaPackages, rocmPackages, python3Packages, mkShell; unfree and platform checks
like check-meta). Nothing here is built: the tests assert what each output *would*
build with (CMake flags per backend, CUDA/HIP architectures, src = the locked FOD,
no stripping for cosmo binaries, the cosmocc pre-seed) and that every derivation
instantiates. The real pins of pylmserv.lock are used where no fetch is needed; a
lock served on 127.0.0.1 where instantiation must fetch the sources.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from pylmserv.core.hashing import Hash
from tests.support import flakeworld as fw

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.nix


def standin_eval(flake, attr, apply):
    proc = fw.nix("nix", "eval", "--json", "--no-write-lock-file", "--override-input", "nixpkgs",
                  f"path:{fw.STANDIN}", f"path:{flake}#{attr}", "--apply", apply)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def repo_flake(nix, tmp_path):
    """The flake with the repository's real pylmserv.lock (published pins)."""
    flake = fw.copy_flake(tmp_path / "flake")
    shutil.copy2(fw.REPO / "pylmserv.lock", flake / "pylmserv.lock")
    return flake


@pytest.fixture
def real_lock():
    return tomllib.loads((fw.REPO / "pylmserv.lock").read_text())


PACKAGES = r"""
ps: let
  x = ps.x86_64-linux; a = ps.aarch64-linux; d = ps.aarch64-darwin;
  names = l: map (i: i.name) l;
  src = p: { inherit (p.src) name outputHash outputHashMode; url = p.src.pin.url; lockName = p.src.lockName; };
  llama = p: { flags = p.cmakeFlags; inputs = names (p.nativeBuildInputs ++ p.buildInputs);
               inherit (p) stdenv backend pname version env; src = src p; };
  withPrefix = pre: set: builtins.filter (n: builtins.match "${pre}.*" n != null) (builtins.attrNames set);
in {
  names = builtins.mapAttrs (_: builtins.attrNames) ps;
  llama = builtins.mapAttrs (_: llama) {
    cpu = x.llama-cpp; cuda = x.llama-cpp-cuda; rocm = x.llama-cpp-rocm; vulkan = x.llama-cpp-vulkan;
    metal = d.llama-cpp; aarch64-cpu = a.llama-cpp; aarch64-cuda = a.llama-cpp-cuda;
  };
  cudaOverride = (x.llama-cpp-cuda.override { cudaCapabilities = [ "8.6" "8.9" ]; }).cmakeFlags;
  rocmOverride = (x.llama-cpp-rocm.override { rocmGpuTargets = "gfx1100"; }).cmakeFlags;
  cosmocc = { inherit (x.cosmocc) dontStrip dontPatchELF dontFixup dontPatchShebangs version installPhase;
              src = src x.cosmocc; srcPath = x.cosmocc.src.outPath; inputs = names x.cosmocc.nativeBuildInputs; };
  cosmoccs = map (n: { name = n; inherit (x.${n}) version; hash = x.${n}.src.outputHash; }) (withPrefix "cosmocc-" x);
  llamafile = { inherit (x.llamafile) dontStrip dontPatchELF postPatch preBuild cosmoccSeed makeFlags version pname;
                cosmocc = x.llamafile.cosmocc.outPath; cosmoccPath = x.cosmocc.outPath; src = src x.llamafile; };
  llamafileCuda = { inherit (x.llamafile-cuda) postBuild postInstall nvccFlags stdenv dontStrip pname;
                    inputs = names (x.llamafile-cuda.nativeBuildInputs ++ x.llamafile-cuda.buildInputs); };
  pylmserv = { inherit (x.pylmserv) pname version doCheck pytestFlagsArray;
               deps = names x.pylmserv.propagatedBuildInputs; same = x.default.drvPath == x.pylmserv.drvPath; };
  models = builtins.listToAttrs (map (n: { name = n; value = { inherit (x.${n}) name outputHash outputHashMode url system builder; path = x.${n}.outPath; }; })
    (withPrefix "model-" x));
}
"""


def _flag(flags, name):
    hits = [f for f in flags if f.startswith(f"-D{name}:")]
    assert len(hits) == 1, (name, flags)
    return hits[0].split("=", 1)[1]


def test_outputs_per_system(repo_flake, real_lock):
    got = standin_eval(repo_flake, "packages", "ps: builtins.mapAttrs (_: builtins.attrNames) ps")
    models = {f"model-{n}" for n in real_lock["models"]}
    sources = {f"source-{n}" for n in real_lock["sources"]}
    common = {"default", "pylmserv", "llama-cpp", "cosmocc", "llamafile"} | models | sources
    assert set(got) == {"x86_64-linux", "aarch64-linux", "aarch64-darwin"}
    assert set(got["x86_64-linux"]) >= common | {"llama-cpp-cuda", "llama-cpp-rocm", "llama-cpp-vulkan", "llamafile-cuda"}
    assert set(got["aarch64-linux"]) >= common | {"llama-cpp-cuda", "llama-cpp-vulkan"}
    assert not {"llama-cpp-rocm", "llamafile-cuda"} & set(got["aarch64-linux"])
    assert set(got["aarch64-darwin"]) >= common
    assert not {"llama-cpp-cuda", "llama-cpp-rocm", "llama-cpp-vulkan", "llamafile-cuda"} & set(got["aarch64-darwin"])


def test_llama_cpp_cmake_flags_per_backend(repo_flake, real_lock):
    got = standin_eval(repo_flake, "packages", PACKAGES)
    llama = got["llama"]
    expect = {  # backend -> the GGML_* switch that must be on
        "cpu": "GGML_BLAS", "cuda": "GGML_CUDA", "rocm": "GGML_HIP", "vulkan": "GGML_VULKAN", "metal": "GGML_METAL",
        "aarch64-cpu": "GGML_BLAS", "aarch64-cuda": "GGML_CUDA",
    }
    switches = ("GGML_BLAS", "GGML_CUDA", "GGML_HIP", "GGML_VULKAN", "GGML_METAL")
    for variant, on in expect.items():
        flags = llama[variant]["flags"]
        for switch in switches:
            assert _flag(flags, switch) == ("TRUE" if switch == on else "FALSE"), (variant, switch)
        # Portable, and nothing downloaded at build time.
        assert _flag(flags, "GGML_NATIVE") == "FALSE"
        assert _flag(flags, "LLAMA_BUILD_TESTS") == "FALSE"
        assert _flag(flags, "LLAMA_USE_PREBUILT_UI") == "FALSE"
        assert _flag(flags, "LLAMA_BUILD_UI") == "FALSE"
        assert _flag(flags, "LLAMA_CURL") == "FALSE"
        assert _flag(flags, "LLAMA_BUILD_SERVER") == "TRUE"
        assert llama[variant]["version"] == real_lock["sources"]["llama-cpp"]["rev"]

    assert llama["cpu"]["backend"] == "blas" and "blas" in llama["cpu"]["inputs"]
    assert llama["metal"]["backend"] == "metal"
    assert _flag(llama["metal"]["flags"], "GGML_METAL_EMBED_LIBRARY") == "TRUE"


def test_cuda_build_uses_backend_stdenv_driver_runpath_and_arch_string(repo_flake):
    got = standin_eval(repo_flake, "packages", PACKAGES)
    cuda = got["llama"]["cuda"]
    assert cuda["stdenv"] == "cuda-backendStdenv-x86_64-linux"
    assert got["llama"]["cpu"]["stdenv"] == "stdenv-x86_64-linux"
    assert "auto-add-driver-runpath-hook" in cuda["inputs"]
    assert "cudaPackages-cuda_nvcc" in cuda["inputs"] and "cudaPackages-libcublas" in cuda["inputs"]
    # nixpkgs' default capabilities (the stand-in's list), dots dropped, ";"-joined.
    assert _flag(cuda["flags"], "CMAKE_CUDA_ARCHITECTURES") == "50;52;60;61;70;75;80;86;89;90"
    assert _flag(got["cudaOverride"], "CMAKE_CUDA_ARCHITECTURES") == "86;89"
    assert "CMAKE_CUDA_ARCHITECTURES" not in " ".join(got["llama"]["cpu"]["flags"])


def test_rocm_build_sets_hip_architectures_and_env(repo_flake):
    got = standin_eval(repo_flake, "packages", PACKAGES)
    rocm = got["llama"]["rocm"]
    archs = _flag(rocm["flags"], "CMAKE_HIP_ARCHITECTURES")
    assert archs.split(";")[:2] == ["gfx900", "gfx906"] and "gfx1100" in archs.split(";")
    assert _flag(rocm["flags"], "CMAKE_HIP_COMPILER").endswith("-rocmPackages-clang/bin/clang")
    assert rocm["env"]["ROCM_PATH"].endswith("-rocmPackages-clr")
    assert rocm["env"]["HIP_DEVICE_LIB_PATH"].endswith("-rocmPackages-rocm-device-libs/amdgcn/bitcode")
    assert _flag(got["rocmOverride"], "CMAKE_HIP_ARCHITECTURES") == "gfx1100"
    assert {"rocmPackages-clr", "rocmPackages-hipblas", "rocmPackages-rocblas"} <= set(rocm["inputs"])


def test_every_stdenv_package_takes_src_from_the_lock(repo_flake, real_lock):
    got = standin_eval(repo_flake, "packages", PACKAGES)
    pins = real_lock["sources"]
    for variant in ("cpu", "cuda", "rocm", "vulkan", "metal"):
        src = got["llama"][variant]["src"]
        assert src == {"name": "source", "outputHash": pins["llama-cpp"]["hash"], "outputHashMode": "recursive",
                       "url": pins["llama-cpp"]["url"], "lockName": "llama-cpp"}
    assert got["llamafile"]["src"]["outputHash"] == pins["llamafile"]["hash"]
    assert got["llamafile"]["src"]["url"] == pins["llamafile"]["url"]
    cosmocc_pin = pins["cosmocc-" + pins["llamafile"]["cosmocc"].replace(".", "_")]
    assert got["cosmocc"]["src"]["outputHash"] == cosmocc_pin["hash"]
    assert got["cosmocc"]["src"]["outputHashMode"] == "flat"
    # The zip is a flat FOD on exactly the path nixpkgs' fetchurl would give it.
    assert got["cosmocc"]["srcPath"] == fw.fixed_path(Hash.parse(cosmocc_pin["hash"]),
                                                     cosmocc_pin["url"].rsplit("/", 1)[-1], recursive=False)
    assert {c["name"]: c["hash"] for c in got["cosmoccs"]} == {
        name: pin["hash"] for name, pin in pins.items() if name.startswith("cosmocc-")}


def test_models_are_builtin_fetchurl_fods_on_fetchurl_paths(repo_flake, real_lock):
    got = standin_eval(repo_flake, "packages", PACKAGES)["models"]
    assert set(got) == {f"model-{n}" for n in real_lock["models"]}
    for name, pin in real_lock["models"].items():
        model = got[f"model-{name}"]
        assert model["builder"] == "builtin:fetchurl" and model["system"] == "builtin"
        assert (model["url"], model["outputHash"], model["outputHashMode"]) == (pin["url"], pin["hash"], "flat")
        assert model["name"] == pin["file"]
        assert model["path"] == fw.fixed_path(Hash.parse(pin["hash"]), pin["file"], recursive=False)


def test_cosmo_binaries_are_never_stripped_and_cosmocc_is_pre_seeded(repo_flake, real_lock):
    got = standin_eval(repo_flake, "packages", PACKAGES)
    cosmocc = got["cosmocc"]
    assert cosmocc["dontStrip"] and cosmocc["dontPatchELF"] and cosmocc["dontFixup"] and cosmocc["dontPatchShebangs"]
    assert "unzip" in cosmocc["inputs"] and "unzip -q $src -d $out" in cosmocc["installPhase"]
    assert "chmod a+x" in cosmocc["installPhase"]

    version = real_lock["sources"]["llamafile"]["cosmocc"]
    lf = got["llamafile"]
    assert lf["dontStrip"] and lf["dontPatchELF"]
    assert lf["cosmoccSeed"] == f".cosmocc/{version}"
    assert lf["cosmocc"] == lf["cosmoccPath"]  # the flake's cosmocc package, not another
    assert f"ln -s {lf['cosmoccPath']} .cosmocc/{version}" in lf["postPatch"]
    assert "export HOME=$TMPDIR" in lf["preBuild"]
    assert lf["version"] == real_lock["sources"]["llamafile"]["rev"]
    assert any(f.startswith("PREFIX=/") for f in lf["makeFlags"])


def test_llamafile_cuda_builds_ggml_cuda_with_nvcc_and_embeds_it(repo_flake):
    got = standin_eval(repo_flake, "packages", PACKAGES)["llamafileCuda"]
    assert got["pname"] == "llamafile-cuda" and got["dontStrip"]
    assert got["stdenv"] == "cuda-backendStdenv-x86_64-linux"
    assert "cudaPackages-cuda_nvcc" in got["inputs"]
    assert "-gencode=arch=compute_89,code=sm_89" in got["nvccFlags"]
    assert "-march=native" not in " ".join(got["nvccFlags"])
    assert "--linker-options=-rpath,/run/opengl-driver/lib" in got["nvccFlags"]
    assert "nvcc " in got["postBuild"] and "-o ggml-cuda.so ggml-cuda.cu" in got["postBuild"]
    assert "zipalign -j0 $out/bin/llamafile cuda-build/ggml-cuda.so" in got["postInstall"]


def test_pylmserv_package_takes_its_dependencies_from_pyproject(repo_flake):
    got = standin_eval(repo_flake, "packages", PACKAGES)["pylmserv"]
    pyproject = tomllib.loads((fw.REPO / "pyproject.toml").read_text())
    assert got["pname"] == "pylmserv" and got["version"] == pyproject["project"]["version"]
    assert got["same"], "packages.default is pylmserv"
    wanted = {d.split(">")[0].split("=")[0].split(";")[0].split("<")[0].strip().lower()
              for d in pyproject["project"]["dependencies"] if "python_version < '3.11'" not in d}
    assert {d.split("-", 1)[1] for d in got["deps"]} == wanted  # stand-in python is 3.12: no tomli
    assert got["doCheck"] is False


def test_dev_shells_apps_checks_and_overlay(repo_flake):
    shells = standin_eval(repo_flake, "devShells", r"""
      ds: let names = l: map (p: p.name) l; x = ds.x86_64-linux; in {
        systems = builtins.mapAttrs (_: builtins.attrNames) ds;
        default = names x.default.nativeBuildInputs;
        python = names (builtins.head x.default.nativeBuildInputs).packages;
        cuda = names x.cuda.nativeBuildInputs;
        rocm = names x.rocm.nativeBuildInputs;
        cosmocc = x.default.PYLMSERV_COSMOCC;
        rocmPath = x.rocm.ROCM_PATH;
      }""")
    assert shells["systems"] == {"x86_64-linux": ["cuda", "default", "rocm"], "aarch64-linux": ["cuda", "default"],
                                 "aarch64-darwin": ["default"]}
    for tool in ("cmake", "ninja", "ccache", "git", "unzip", "nix-prefetch-git", "cosmocc-3.3.6"):
        assert tool in shells["default"], tool
    assert shells["default"][0].startswith("python3-") and shells["default"][0].endswith("-env")
    assert {"python3.12-click", "python3.12-requests", "python3.12-pytest", "python3.12-gguf"} <= set(shells["python"])
    assert "cudaPackages-cuda_nvcc" in shells["cuda"] and "cudaPackages-cuda_nvcc" not in shells["default"]
    assert "rocmPackages-clr" in shells["rocm"] and shells["rocmPath"].endswith("-rocmPackages-clr")
    assert shells["cosmocc"].endswith("-cosmocc-3.3.6")

    apps = standin_eval(repo_flake, "apps", "a: builtins.mapAttrs (_: s: builtins.mapAttrs (_: x: x.type) s) a")
    assert apps["x86_64-linux"] == {"default": "app", "pylmserv": "app", "llama-server": "app"}

    checks = standin_eval(repo_flake, "checks", "c: builtins.mapAttrs (_: s: builtins.mapAttrs (_: t: t.doCheck) s) c")
    assert checks["x86_64-linux"] == {"pylmserv-tests": True}
    assert standin_eval(repo_flake, "overlays", "o: builtins.isFunction o.default") is True


def test_standin_refuses_unfree_cuda_like_nixpkgs(nix):
    """The stand-in is not a pushover: CUDA without allowUnfree fails, so the flake's
    passing CUDA evaluation above shows it really asks for allowUnfree."""
    proc = fw.nix("nix", "eval", "--raw", f"path:{fw.STANDIN}#legacyPackages.x86_64-linux.cudaPackages.cuda_nvcc.name")
    assert proc.returncode != 0 and "unfree" in proc.stderr


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

    # `nix build .#source-llama-cpp` lands exactly on the package's src.
    built = fw.nix("nix", "build", "--no-link", "--json", f"path:{world.flake}#source-llama-cpp")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)[0]["outputs"]["out"] == got["llamaSrc"]

    apps = standin_eval(world.flake, "apps", "a: builtins.mapAttrs (_: x: x.program) a.x86_64-linux")
    llama_out = standin_eval(world.flake, "packages", "ps: ps.x86_64-linux.llama-cpp.outPath")
    assert apps["llama-server"] == f"{llama_out}/bin/llama-server"
    assert apps["pylmserv"].endswith("/bin/pylmserv")


def test_missing_cosmocc_pin_is_a_clear_evaluation_error(world):
    text = (world.flake / "pylmserv.lock").read_text().replace('cosmocc = "3.3.6"', 'cosmocc = "9.9.9"')
    (world.flake / "pylmserv.lock").write_text(text)
    proc = fw.nix("nix", "eval", "--raw", "--no-write-lock-file", "--override-input", "nixpkgs", f"path:{fw.STANDIN}",
                  f"path:{world.flake}#packages.x86_64-linux.llamafile.drvPath")
    assert proc.returncode != 0
    assert 'no [sources.cosmocc-*] with version = "9.9.9"' in proc.stderr


def test_nix_flake_check_evaluates_every_output(world):
    """`nix flake check --no-build`: schema of every output (apps, overlays, devShells,
    checks) and instantiation of every derivation, against the stand-in."""
    proc = fw.nix("nix", "flake", "check", "--no-build", "--no-write-lock-file", "--override-input", "nixpkgs",
                  f"path:{fw.STANDIN}", f"path:{world.flake}")
    assert proc.returncode == 0, proc.stderr
    assert "evaluating 'packages.x86_64-linux.llamafile-cuda'" in proc.stderr or proc.stderr.count("error") == 0
