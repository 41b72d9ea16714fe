# A small stand-in of the nixpkgs interface (tests only). nixpkgs cannot be fetched on
# the test machines, so pylmserv's flake is evaluated against this with
#   nix eval --override-input nixpkgs path:<prepared copy of tests/nixpkgs-standin> ...
# `lib` is nixpkgs' real lib (unpacked into ./lib by the tests). Packages: see pkgs.nix.
{
  description = "nixpkgs stand-in for evaluating pylmserv's flake offline (tests only)";
  outputs = { self }: {
    lib = import ./lib;
    legacyPackages = builtins.listToAttrs (map (system: {
      name = system;
      value = import ./default.nix { inherit system; };
    }) [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ]);
  };
}
