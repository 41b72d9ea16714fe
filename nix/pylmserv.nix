# The pylmserv CLI as a Python application. Its dependencies are read from
# pyproject.toml (PEP 621), so the package and the flake cannot list different ones.
{
  lib,
  python3Packages,
  git,
  zip,
  unzip,
  cmake,
  ninja,
  src, # pyproject.toml + pylmserv/ only (lib.fileset in flake.nix)
  checkSrc ? src, # the same plus tests/, for doCheck
  pyproject, # builtins.fromTOML of pyproject.toml
  doCheck ? false, # the flake's `checks` turn this on: pylmserv's offline tests
}:

let
  project = pyproject.project;
  pythonVersion = python3Packages.python.pythonVersion;

  # "tomli>=1.1; python_version < '3.11'" -> "tomli", or null when the marker excludes it.
  requirementName = spec:
    let
      # PEP 503's normal form (huggingface_hub -> huggingface-hub), as nixpkgs names them
      name = lib.replaceStrings [ "_" "." ] [ "-" "-" ]
        (lib.toLower (builtins.head (builtins.match "[[:space:]]*([A-Za-z0-9_.-]+).*" spec)));
      below = builtins.match ".*python_version[[:space:]]*<[[:space:]]*['\"]([0-9.]+)['\"].*" spec;
      applies = below == null || lib.versionOlder pythonVersion (builtins.head below);
    in
    if applies then name else null;

  names = specs: lib.filter (n: n != null) (map requirementName specs);
  requirements = names (project.dependencies or [ ]);
  # The [test] extra, minus what the Nix build provides otherwise (pytest via the hook;
  # cmake/ninja as the nixpkgs tools below, not as PyPI wheels).
  testRequirements = lib.filter (n: !(lib.elem n [ "pytest" "cmake" "ninja" ]))
    (names (project.optional-dependencies.test or [ ]));
  # Programs the offline tests run (git repositories, zip fixtures, the CMake option
  # mapping); the C compiler and make come with stdenv.
  checkTools = [ git zip unzip cmake ninja ];

  pkgsFor = map (n: python3Packages.${n} or (throw "pylmserv.nix: python3Packages has no '${n}' (from pyproject.toml)"));
in

python3Packages.buildPythonApplication {
  pname = project.name;
  version = project.version;
  src = if doCheck then checkSrc else src;
  pyproject = true;

  # pyproject.toml names README.md as the long description; the source leaves it out
  # (README edits must not rebuild the package), so give setuptools a short one.
  postPatch = ''
    [ -e README.md ] || printf '%s\n' ${lib.escapeShellArg (project.description or project.name)} > README.md
  '';

  build-system = [ python3Packages.setuptools ];
  dependencies = pkgsFor requirements;

  inherit doCheck;
  nativeCheckInputs = [ python3Packages.pytestCheckHook ] ++ pkgsFor testRequirements ++ checkTools;
  # Offline only: the sandbox has loopback but no internet, and no Nix inside; the
  # slow end-to-end builds are CI's. Tests that need ../shared/fixtures skip themselves.
  # One -m expression, built by pytestCheckHook from the marks (not pytestFlagsArray, which
  # it `eval`s, nor pytestFlags: both split "not slow and not nix" into words without
  # __structuredAttrs). tests/test_flake_pytest_hook.py expands it as nixpkgs does.
  disabledTestMarks = [ "slow" "nix" ];
  preCheck = ''
    export HOME=$TMPDIR
  '';
  pythonImportsCheck = [ "pylmserv" ];

  passthru = { inherit requirements testRequirements checkTools; };

  meta = {
    description = project.description or "pylmserv";
    license = lib.licenses.mit;
    mainProgram = "pylmserv";
  };
}
