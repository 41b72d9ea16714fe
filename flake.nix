{
  description = "pylmserv: llama.cpp and llamafile per backend from pinned sources, GGUF models as fixed-output derivations; every pin read from pylmserv.lock";

  # flake.lock pins nixos-25.11 at 8fd9daa3db09ced9700431c5b7ad0e8ba199b575 (2026-05-10)
  # with narHash sha256-Ti+ZBvW6yrWWAg2szExVTwCd4qOJ3KlVr1tFHfyfi8Q= (lastModified
  # 1778430510): a published pair copied from public flake.lock files (not computed here:
  # no network; check with `nix flake metadata` or `nix flake lock --update-input
  # nixpkgs`). Its ROCm is >= 6.1 (llama.cpp's ggml-hip floor), its CUDA 12.x.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      # The one source of truth, shared with the pylmserv CLI.
      lock = builtins.fromTOML (builtins.readFile ./pylmserv.lock);

      pyproject =
        if builtins.pathExists ./pyproject.toml then
          builtins.fromTOML (builtins.readFile ./pyproject.toml)
        else
          { project = { name = "pylmserv"; version = "0.0.0"; dependencies = [ ]; }; };

      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
      forAllSystems = genAttrs systems;
      isLinux = system: builtins.match ".*-linux" system != null;
      # Only what applies on a system: CUDA/Vulkan on Linux, ROCm on x86_64-linux.
      when = cond: attrs: if cond then attrs else { };
      prefixed = prefix: set:
        builtins.listToAttrs (map (name: { name = "${prefix}${name}"; value = set.${name}; }) (builtins.attrNames set));

      # Pins without nixpkgs (builtin fetchers): models and most sources evaluate and
      # build without fetching nixpkgs; a pin whose hash is for nixpkgs' fetchgit uses it.
      fetchedFor = system: import ./nix/sources.nix { inherit lock; pkgs = pkgsFor.${system}.plain; preferBuiltins = true; };
      # Without any nixpkgs (flake-level `lib`): the same models and sources.
      fetchedBare = import ./nix/sources.nix { inherit lock; };

      # One nixpkgs, plus one that allows CUDA's unfree licence. GPU support is switched on
      # per package (.override { cudaSupport = true; }), not by a global cudaSupport or
      # rocmSupport, which would rebuild the rest of the set (BLAS, MPI, ...) and miss
      # cache.nixos.org for all of it.
      nixpkgsFor = system: config: import nixpkgs {
        inherit system config;
        overlays = [ self.overlays.default ];
      };
      pkgsFor = forAllSystems (system: rec {
        plain = nixpkgsFor system { };
        cuda = nixpkgsFor system { allowUnfree = true; };
        rocm = plain;
      });

      cosmoccVersion =
        let v = lock.sources.llamafile.cosmocc or (throw "pylmserv.lock: [sources.llamafile] has no 'cosmocc' version");
        in if fetchedBare.validVersion v then v
        else throw "pylmserv.lock: [sources.llamafile] has cosmocc = ${builtins.toJSON v}, which is not a plain version string (letters, digits, '.', '_', '+', '-')";
      # The lock names toolchains cosmocc-3_3_6 etc.; match on their `version`.
      cosmoccPins = builtins.filter (name: (lock.sources.${name}.version or null) == cosmoccVersion && builtins.match "cosmocc.*" name != null)
        (builtins.attrNames (lock.sources or { }));
      cosmoccPin =
        if cosmoccPins == [ ] then
          throw "pylmserv.lock: no [sources.cosmocc-*] with version = ${builtins.toJSON cosmoccVersion} (wanted by [sources.llamafile])"
        else
          builtins.head cosmoccPins;

      # The Python package's source: only what the build (and its tests) read, so that
      # editing README.md, docs/ or nix/ does not rebuild pylmserv. lib.fileset needs
      # builtins.readFileType (Nix >= 2.14, as nixpkgs itself does); an older Nix gets
      # the same files through a builtins.path filter.
      pylmservSrc = lib: withTests:
        let
          fs = lib.fileset;
          wanted = [ "pyproject.toml" "pylmserv" ] ++ (if withTests then [ "tests" ] else [ ]);
          root = toString ./.;
          under = path: top: path == "${root}/${top}" || lib.hasPrefix "${root}/${top}/" path;
        in
        if builtins ? readFileType then
          fs.toSource {
            root = ./.;
            fileset = fs.unions (map (top: fs.maybeMissing (./. + "/${top}")) wanted);
          }
        else
          builtins.path {
            name = "source";
            path = ./.;
            filter = path: type: builtins.any (top: under path top || lib.hasPrefix "${path}/" "${root}/${top}") wanted;
          };
    in
    {
      lib = {
        inherit lock;
        inherit (fetchedBare) sources models;
        inherit cosmoccVersion cosmoccPin;
      };

      nixosModules.default = import ./nix/module.nix { inherit self; };

      overlays.default = final: prev:
        let
          # Build-time fetchers (fetchFromGitHub/fetchzip/fetchgit) wherever the lock's
          # fetcher allows: substitutable, no network at evaluation.
          fetched = import ./nix/sources.nix { inherit lock; pkgs = final; preferBuiltins = false; };
          llamaPin = lock.sources.llama-cpp;
        in
        {
          pylmservLock = lock;
          pylmservSources = fetched.sources;
          pylmservModels = fetched.models;

          pylmserv = final.callPackage ./nix/pylmserv.nix {
            inherit pyproject;
            src = pylmservSrc final.lib false;
            checkSrc = pylmservSrc final.lib true;
          };

          pylmserv-llama-cpp = final.callPackage ./nix/llama-cpp.nix {
            src = fetched.sources.llama-cpp;
            inherit (fetched.sources.llama-cpp) version;
            buildCommit = llamaPin.commit or fetched.sources.llama-cpp.version;
          };

          pylmserv-cosmocc = final.callPackage ./nix/cosmocc.nix {
            src = fetched.sources.${cosmoccPin};
            version = fetched.sources.${cosmoccPin}.version;
          };

          pylmserv-llamafile = final.callPackage ./nix/llamafile.nix {
            src = fetched.sources.llamafile;
            inherit (fetched.sources.llamafile) version;
            cosmocc = final.pylmserv-cosmocc;
            inherit cosmoccVersion;
          };
        };

      packages = forAllSystems (
        system:
        let
          p = pkgsFor.${system};
          linux = isLinux system;
          fetched = fetchedFor system;
        in
        prefixed "model-" fetched.models
        // prefixed "source-" fetched.sources
        // {
          default = p.plain.pylmserv;
          pylmserv = p.plain.pylmserv;
          llama-cpp = p.plain.pylmserv-llama-cpp;
        }
        # cosmocc and llamafile: Linux until a darwin build has been seen (nixpkgs' own
        # cosmocc is linux-only too).
        // when linux {
          cosmocc = p.plain.pylmserv-cosmocc;
          llamafile = p.plain.pylmserv-llamafile;
        }
        // when linux (prefixed "cosmocc-" (builtins.listToAttrs (map (name: {
          name = builtins.replaceStrings [ "cosmocc-" "cosmocc" ] [ "" "" ] name;
          value = p.plain.pylmserv-cosmocc.override {
            src = p.plain.pylmservSources.${name};
            version = p.plain.pylmservSources.${name}.version;
          };
        }) (builtins.filter (n: builtins.match "cosmocc-.+" n != null) (builtins.attrNames (lock.sources or { }))))))
        // when linux {
          llama-cpp-cuda = p.cuda.pylmserv-llama-cpp.override { cudaSupport = true; };
          llama-cpp-vulkan = p.plain.pylmserv-llama-cpp.override { useVulkan = true; };
        }
        // when (system == "x86_64-linux") {
          llama-cpp-rocm = p.rocm.pylmserv-llama-cpp.override { rocmSupport = true; };
          llamafile-cuda = p.cuda.pylmserv-llamafile.override { cudaSupport = true; };
        }
      );

      apps = forAllSystems (system: {
        default = self.apps.${system}.pylmserv;
        pylmserv = {
          type = "app";
          program = "${self.packages.${system}.pylmserv}/bin/pylmserv";
          meta.description = "pylmserv: build llama.cpp/llamafile from the lock, fetch hash-verified GGUF models";
        };
        llama-server = {
          type = "app";
          program = "${self.packages.${system}.llama-cpp}/bin/llama-server";
          meta.description = "llama.cpp's OpenAI-compatible server (CPU build), pinned by pylmserv.lock";
        };
      });

      devShells = forAllSystems (
        system:
        let
          p = pkgsFor.${system};
          shell = pkgs: variant: pkgs.callPackage ./nix/shells.nix {
            inherit variant;
            cosmocc = pkgs.pylmserv-cosmocc;
            cosmoccZip = pkgs.pylmservSources.${cosmoccPin};
            pylmserv = pkgs.pylmserv;
            llama-cpp = pkgs.pylmserv-llama-cpp.override (
              if variant == "cuda" then { cudaSupport = true; }
              else if variant == "rocm" then { rocmSupport = true; }
              else { });
          };
        in
        { default = shell p.plain "default"; }
        // when (isLinux system) { cuda = shell p.cuda "cuda"; }
        // when (system == "x86_64-linux") { rocm = shell p.rocm "rocm"; }
      );

      checks = forAllSystems (system: {
        # pylmserv's offline test suite (no network, no Nix inside the sandbox).
        pylmserv-tests = pkgsFor.${system}.plain.pylmserv.override { doCheck = true; };
      });
    };
}
