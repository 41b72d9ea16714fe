# The pylmserv CLI as a Python application. Its dependencies are read from
# pyproject.toml (PEP 621), so the package and the flake cannot list different ones.
{
  lib,
  python3Packages,
  src,
  pyproject, # builtins.fromTOML of pyproject.toml
  doCheck ? false, # the flake's `checks` turn this on: pylmserv's offline tests
}:

let
  project = pyproject.project;
  pythonVersion = python3Packages.python.pythonVersion;

  # "tomli>=1.1; python_version < '3.11'" -> "tomli", or null when the marker excludes it.
  requirementName = spec:
    let
      name = lib.toLower (builtins.head (builtins.match "[[:space:]]*([A-Za-z0-9_.-]+).*" spec));
      below = builtins.match ".*python_version[[:space:]]*<[[:space:]]*['\"]([0-9.]+)['\"].*" spec;
      applies = below == null || lib.versionOlder pythonVersion (builtins.head below);
    in
    if applies then name else null;

  names = specs: lib.filter (n: n != null) (map requirementName specs);
  requirements = names (project.dependencies or [ ]);
  # The [test] extra, minus what the Nix build provides otherwise (pytest via the hook;
  # cmake/ninja wheels are only needed by the slow end-to-end builds, skipped here).
  testRequirements = lib.filter (n: !(lib.elem n [ "pytest" "cmake" "ninja" ]))
    (names (project.optional-dependencies.test or [ ]));

  pkgsFor = map (n: python3Packages.${n} or (throw "pylmserv.nix: python3Packages has no '${n}' (from pyproject.toml)"));
in

python3Packages.buildPythonApplication {
  pname = project.name;
  version = project.version;
  inherit src;
  pyproject = true;

  build-system = [ python3Packages.setuptools ];
  dependencies = pkgsFor requirements;

  inherit doCheck;
  nativeCheckInputs = [ python3Packages.pytestCheckHook ] ++ pkgsFor testRequirements;
  # Offline only: the sandbox has loopback but no internet, and no Nix inside.
  pytestFlagsArray = [ "-m" "not slow and not nix" ];
  preCheck = ''
    export HOME=$TMPDIR
  '';
  pythonImportsCheck = [ "pylmserv" ];

  passthru = { inherit requirements testRequirements; };

  meta = {
    description = project.description or "pylmserv";
    license = lib.licenses.mit;
    mainProgram = "pylmserv";
  };
}
