"""The flake's NixOS module (nix/module.nix), evaluated with nixpkgs' real lib.

NixOS itself cannot be fetched here, so what is real and what stands in:
- real: nixpkgs' `lib` (the fixture, nix-community/nixpkgs.lib de42d44) and its
  `lib.evalModules` with the module's own option types, defaults and assertions; the
  flake (copied), its overlay, its model FODs from the repository's pylmserv.lock, its
  llama-cpp package instantiated on the package stand-in (tests/nixpkgs-standin), and
  Nix 2.8 evaluating all of it; the model store paths are Nix's own answer
  (`nix-store --print-fixed-path` for each pinned hash).
- stand-ins, named so: the NixOS options the module sets (`systemd.services`,
  `assertions`: STANDIN_NIXOS below declares just those), and nixpkgs' writeText /
  writeShellScript (the text written with builtins.toFile, so a test can read it back).
What is not evaluated: NixOS's own systemd unit generation from serviceConfig, and
whether systemd accepts the result (the CLI's unit gets `systemd-analyze verify` in
tests/test_serve_unit.py).
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys

import pytest

from pylmserv.core.hashing import Hash
from tests.support import flakeworld as fw
from tests.support.nixenv import have_nix, nix_env

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.nix

STANDIN_NIXOS = r"""
  # Stand-ins for the NixOS options the module sets (not NixOS: just these declarations).
  standinNixos = { lib, ... }: with lib; {
    options.assertions = mkOption {
      type = types.listOf (types.submodule { options = { assertion = mkOption { type = types.bool; };
                                                         message = mkOption { type = types.str; }; }; });
      default = [ ];
    };
    options.systemd.services = mkOption {
      type = types.attrsOf (types.submodule { options = {
        description = mkOption { type = types.str; default = ""; };
        wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
        after = mkOption { type = types.listOf types.str; default = [ ]; };
        environment = mkOption { type = types.attrsOf types.str; default = { }; };
        serviceConfig = mkOption { type = types.attrsOf types.anything; default = { }; };
      }; });
      default = { };
    };
  };
"""


def module_eval(flake, settings: str, nixpkgs_config: str = "{ }") -> dict:
    """Evaluate nixosModules.default with `services.pylmserv = SETTINGS;` on the real lib."""
    standin = fw.standin()
    apply = f"""module: let
      lib = import {standin}/lib;
      base = import {standin} {{ config = {nixpkgs_config}; }};
      # Stand-ins for two trivial builders (text back through builtins.toFile, context dropped):
      pkgs = base // {{
        writeText = name: text: builtins.toFile name (builtins.unsafeDiscardStringContext text);
        writeShellScript = name: text: builtins.toFile name
          (builtins.unsafeDiscardStringContext ("#!/bin/sh\\n" + text));
      }};
      {STANDIN_NIXOS}
      eval = lib.evalModules {{ modules = [ module standinNixos {{ _module.args.pkgs = pkgs; }}
                                           {{ services.pylmserv = {settings}; }} ]; }};
      svc = eval.config.systemd.services.pylmserv or null;
      read = p: builtins.readFile p;
      failed = map (a: a.message) (builtins.filter (a: !a.assertion) eval.config.assertions);
    in {{
      inherit failed;
      service = if failed != [ ] || svc == null then null else svc // {{
        serviceConfig = svc.serviceConfig // {{ ExecStart = toString svc.serviceConfig.ExecStart; }};
      }};
      start = if failed != [ ] || svc == null then null else read svc.serviceConfig.ExecStart;
      package = if failed != [ ] || svc == null then null else toString eval.config.services.pylmserv.package;
    }}"""
    proc = fw.nix("nix", "eval", "--json", "--impure", *fw.override_nixpkgs(), f"path:{flake}#nixosModules.default",
                  "--apply", apply)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _find_fixture():
    for parent in fw.REPO.parents:
        candidate = parent / "shared" / "fixtures" / fw.NIXPKGS_LIB_FIXTURE.name
        if candidate.is_file():
            return candidate
    return fw.NIXPKGS_LIB_FIXTURE


@pytest.fixture(scope="module")
def flake(tmp_path_factory):
    if not have_nix():
        if __import__("os").environ.get("CI"):
            pytest.fail("nix-bin is not installed; scripts/setup-dev.sh installs it")
        pytest.skip("real Nix not installed (apt-get install nix-bin)")
    patch = pytest.MonkeyPatch()
    for key, value in nix_env().items():
        patch.setenv(key, value)
    patch.setattr(fw, "NIXPKGS_LIB_FIXTURE", _find_fixture())  # a git worktree sits one level deeper
    flake = fw.copy_flake(tmp_path_factory.mktemp("module") / "flake")
    shutil.copy2(fw.REPO / "pylmserv.lock", flake / "pylmserv.lock")
    yield flake
    patch.undo()


@pytest.fixture(scope="module")
def lock():
    return tomllib.loads((fw.REPO / "pylmserv.lock").read_text())


def model_path(lock, name: str) -> str:
    """Nix's own store path for the model's fixed-output derivation."""
    entry = lock["models"][name]
    file = entry.get("file") or entry["url"].rsplit("/", 1)[-1]
    return fw.fixed_path(Hash.parse(entry["hash"]), file.rsplit("/", 1)[-1], recursive=False)


def test_two_models_router_unit(flake, lock):
    chat, embed = "qwen2_5-0_5b-instruct", "smollm2-135m-instruct"
    got = module_eval(flake, f"""{{ enable = true; models = [ "{chat}" "{embed}" ]; port = 8123;
        embedding = [ "{embed}" ]; apiKeyFile = "/run/keys/llm"; maxLoaded = 1; idleUnload = 600;
        modelArgs.{chat} = {{ ctx-size = 4096; jinja = true; }}; extraArgs = [ "--threads" "4" ]; }}""")
    assert got["failed"] == []
    svc = got["service"]
    sc = svc["serviceConfig"]
    for key, value in {"NoNewPrivileges": True, "ProtectSystem": "strict", "ProtectHome": True, "PrivateTmp": True,
                       "DynamicUser": True, "IPAddressDeny": "any", "IPAddressAllow": "localhost",
                       "PrivateDevices": True}.items():
        assert sc[key] == value, key
    assert sc["RestrictAddressFamilies"] == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert sc["LoadCredential"] == ["api-key:/run/keys/llm"]
    assert svc["wantedBy"] == ["multi-user.target"] and svc["environment"]["LLAMA_CACHE"] == "/run/pylmserv"

    start = got["start"]
    assert sc["ExecStart"].endswith("-pylmserv-start")
    assert 'LLAMA_API_KEY="$(< "$CREDENTIALS_DIRECTORY/api-key")"' in start and "/run/keys/llm" not in start
    exec_line = [line for line in start.splitlines() if line.startswith("exec ")][0]
    argv = shlex.split(exec_line)[1:]
    assert argv[0] == got["package"] + "/bin/llama-server"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--models-max") + 1] == "1" and argv[-2:] == ["--threads", "4"]
    assert "--api-key" not in argv and "-m" not in argv
    preset = open(argv[argv.index("--models-preset") + 1]).read()
    sections = preset.split("\n[")
    assert "sleep-idle-seconds = 600" in next(s for s in sections if s.startswith("*]"))
    chat_sec = next(s for s in sections if s.startswith(f"{chat}]"))
    embed_sec = next(s for s in sections if s.startswith(f"{embed}]"))
    assert f"model = {model_path(lock, chat)}" in chat_sec and "ctx-size = 4096" in chat_sec and "jinja = true" in chat_sec
    assert f"model = {model_path(lock, embed)}" in embed_sec and "embeddings = true" in embed_sec


def test_one_model_cuda_runs_llama_server_on_it(flake, lock):
    name = "smollm2-135m-instruct"
    got = module_eval(flake, f"""{{ enable = true; models = [ "{name}" ]; backend = "cuda"; embedding = [ "{name}" ]; }}""",
                      nixpkgs_config="{ allowUnfree = true; cudaSupport = true; }")  # CUDA is unfree: the host's choice
    assert got["failed"] == []
    argv = shlex.split([line for line in got["start"].splitlines() if line.startswith("exec ")][0])[1:]
    assert argv[1:3] == ["-m", model_path(lock, name)] and "--embeddings" in argv and "--models-preset" not in argv
    assert "LLAMA_API_KEY" not in got["start"]
    assert got["service"]["serviceConfig"]["PrivateDevices"] is False  # the GPU's device nodes
    assert got["service"]["serviceConfig"]["LoadCredential"] == []
    cpu = module_eval(flake, f"""{{ enable = true; models = [ "{name}" ]; }}""")
    assert got["package"] != cpu["package"]  # another build of the flake's llama-cpp


@pytest.mark.parametrize("settings, message", [
    ('{ enable = true; models = [ ]; }', "name at least one model"),
    ('{ enable = true; models = [ "smollm2-135m-instruct" ]; apiKeyFile = "/nix/store/abc-key"; }', "Nix store"),
    ('{ enable = true; models = [ "smollm2-135m-instruct" ]; preload = [ "qwen2_5-0_5b-instruct" ]; }',
     "not one of services.pylmserv.models"),
    ('{ enable = true; models = [ "smollm2-135m-instruct" ]; modelArgs.smollm2-135m-instruct.port = 1; }',
     "set by the module itself"),
    ('{ enable = true; models = [ "smollm2-135m-instruct" ]; extraArgs = [ "--host=0.0.0.0" ]; }',
     "--host is set by the module"),
])
def test_module_assertions(flake, settings, message):
    got = module_eval(flake, settings)
    assert any(message in m for m in got["failed"]), got["failed"]


def test_unknown_model_is_a_type_error(flake):
    proc = fw.nix("nix", "eval", "--json", "--impure", *fw.override_nixpkgs(), f"path:{flake}#nixosModules.default",
                  "--apply", f"""module: let lib = import {fw.standin()}/lib; {STANDIN_NIXOS}
                    eval = lib.evalModules {{ modules = [ module standinNixos {{ _module.args.pkgs = {{ }}; }}
                      {{ services.pylmserv = {{ enable = true; models = [ "not-in-the-lock" ]; }}; }} ]; }};
                    in eval.config.services.pylmserv.models""")
    assert proc.returncode != 0 and "not-in-the-lock" in proc.stderr
