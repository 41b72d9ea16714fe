{
  description = "pylmserv: llama.cpp and llamafile per backend from pinned sources, GGUF models as fixed-output derivations; every pin read from pylmserv.lock";

  # flake.lock pins nixos-24.11 at 50ab793786d9de88ee30ec4e4c24fb4236fc2674 with
  # narHash sha256-/bVBlRpECLVzjV19t5KMdMFWSwKLtb5RyXdjz3LJT+g= (lastModified 1751274312):
  # a published pair copied from public flake.lock files, not computed here (no network).
  # `nix flake lock --update-input nixpkgs` moves it.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs =
    { self, nixpkgs }:
    let
      # The one source of truth, shared with the pylmserv CLI.
      lock = builtins.fromTOML (builtins.readFile ./pylmserv.lock);
      fetched = import ./nix/sources.nix { inherit lock; };

      pyproject =
        if builtins.pathExists ./pyproject.toml then
          builtins.fromTOML (builtins.readFile ./pyproject.toml)
        else
          { project = { name = "pylmserv"; version = "0.0.0"; dependencies = [ ]; }; };

      systems = [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" ];
      genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
      forAllSystems = genAttrs systems;
      isLinux = system: builtins.match ".*-linux" system != null;
      # Only what applies on a system: CUDA/Vulkan on Linux, ROCm on x86_64-linux.
      when = cond: attrs: if cond then attrs else { };
      prefixed = prefix: set:
        builtins.listToAttrs (map (name: { name = "${prefix}${name}"; value = set.${name}; }) (builtins.attrNames set));

      # Outputs that need nothing but the lock and Nix's builtin fetchers: they evaluate
      # and build without nixpkgs (nixpkgs is never forced for these attributes).
      fixedOutputs = prefixed "model-" fetched.models // prefixed "source-" fetched.sources;

      # A nixpkgs per flavour; CUDA is unfree, and nixpkgs' cudaSupport/rocmSupport make
      # the rest of the set (e.g. BLAS, MPI) agree with the GPU backend.
      nixpkgsFor = system: config: import nixpkgs {
        inherit system config;
        overlays = [ self.overlays.default ];
      };
      pkgsFor = forAllSystems (system: {
        plain = nixpkgsFor system { };
        cuda = nixpkgsFor system { allowUnfree = true; cudaSupport = true; };
        rocm = nixpkgsFor system { rocmSupport = true; };
      });

      cosmoccVersion = lock.sources.llamafile.cosmocc or (throw "pylmserv.lock: [sources.llamafile] has no 'cosmocc' version");
      # The lock names toolchains cosmocc-3_3_6 etc.; match on their `version`.
      cosmoccPins = builtins.filter (name: (lock.sources.${name}.version or null) == cosmoccVersion && builtins.match "cosmocc.*" name != null)
        (builtins.attrNames (lock.sources or { }));
      cosmoccPin =
        if cosmoccPins == [ ] then
          throw "pylmserv.lock: no [sources.cosmocc-*] with version = \"${cosmoccVersion}\" (wanted by [sources.llamafile])"
        else
          builtins.head cosmoccPins;
    in
    {
      lib = {
        inherit lock;
        inherit (fetched) sources models;
        inherit cosmoccVersion cosmoccPin;
      };

      overlays.default = final: prev: {
        pylmservLock = lock;
        pylmservSources = fetched.sources;
        pylmservModels = fetched.models;

        pylmserv = final.callPackage ./nix/pylmserv.nix {
          inherit pyproject;
          src = final.lib.cleanSource self;
        };

        pylmserv-llama-cpp = final.callPackage ./nix/llama-cpp.nix {
          src = fetched.sources.llama-cpp;
          version = lock.sources.llama-cpp.rev or "0";
        };

        pylmserv-cosmocc = final.callPackage ./nix/cosmocc.nix {
          src = fetched.sources.${cosmoccPin};
          version = cosmoccVersion;
        };

        pylmserv-llamafile = final.callPackage ./nix/llamafile.nix {
          src = fetched.sources.llamafile;
          version = lock.sources.llamafile.rev or "0";
          cosmocc = final.pylmserv-cosmocc;
          inherit cosmoccVersion;
        };
      };

      packages = forAllSystems (
        system:
        let
          p = pkgsFor.${system};
          linux = isLinux system;
        in
        fixedOutputs
        // {
          default = p.plain.pylmserv;
          pylmserv = p.plain.pylmserv;
          llama-cpp = p.plain.pylmserv-llama-cpp;
          cosmocc = p.plain.pylmserv-cosmocc;
          llamafile = p.plain.pylmserv-llamafile;
        }
        // prefixed "cosmocc-" (builtins.listToAttrs (map (name: {
          name = builtins.replaceStrings [ "cosmocc-" "cosmocc" ] [ "" "" ] name;
          value = p.plain.pylmserv-cosmocc.override {
            src = fetched.sources.${name};
            version = lock.sources.${name}.version or name;
          };
        }) (builtins.filter (n: builtins.match "cosmocc-.+" n != null) (builtins.attrNames (lock.sources or { })))))
        // when linux {
          llama-cpp-cuda = p.cuda.pylmserv-llama-cpp.override { useCuda = true; };
          llama-cpp-vulkan = p.plain.pylmserv-llama-cpp.override { useVulkan = true; };
        }
        // when (system == "x86_64-linux") {
          llama-cpp-rocm = p.rocm.pylmserv-llama-cpp.override { useRocm = true; };
          llamafile-cuda = p.cuda.pylmserv-llamafile.override { useCuda = true; };
        }
      );

      apps = forAllSystems (system: {
        default = self.apps.${system}.pylmserv;
        pylmserv = {
          type = "app";
          program = "${self.packages.${system}.pylmserv}/bin/pylmserv";
        };
        llama-server = {
          type = "app";
          program = "${self.packages.${system}.llama-cpp}/bin/llama-server";
        };
      });

      devShells = forAllSystems (
        system:
        let
          p = pkgsFor.${system};
          shell = pkgs: variant: pkgs.callPackage ./nix/shells.nix {
            inherit variant;
            cosmocc = pkgs.pylmserv-cosmocc;
            pylmserv = pkgs.pylmserv;
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
