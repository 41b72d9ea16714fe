# A small stand-in of the nixpkgs interface (tests only). nixpkgs cannot be fetched on
# the test machines, so pylmserv's flake is evaluated against this with
#   nix eval --override-input nixpkgs path:tests/nixpkgs-standin ...
# Leaf packages (compilers, CUDA, ROCm, Python libraries) are real but unbuildable
# derivations: evaluation, store paths and attributes are inspectable. stdenv.mkDerivation
# runs a small stand-in of the generic builder (setup.sh) with host tools, so a package
# needing only those (cosmocc, llamafile against fixture sources) really builds.
{
  description = "nixpkgs stand-in for evaluating pylmserv's flake offline (tests only)";
  outputs = { self }: {
    lib = import ./lib.nix;
    legacyPackages = builtins.listToAttrs (map (system: {
      name = system;
      value = import ./default.nix { inherit system; };
    }) [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" ]);
  };
}
