# A small stand-in of the nixpkgs interface (tests only). nixpkgs cannot be fetched on
# the test machines, so pylmserv's flake is evaluated against this with
#   nix eval --override-input nixpkgs path:tests/nixpkgs-standin ...
# Every package here is a real but unbuildable derivation: evaluation, store paths and
# attributes are inspectable; nothing in it is ever built.
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
