# `import nixpkgs { system; config; overlays; }`, as with the real thing: overlays are
# applied as a fixpoint (final, prev), so overlay packages see each other and the base.
# `lib` is nixpkgs' real lib (tests unpack ../shared/fixtures/nixpkgs-lib-*.tar.gz here
# as ./lib before use; see tests/support/flakeworld.py); only the package set is a stand-in.
{
  system ? builtins.currentSystem or "x86_64-linux",
  config ? { },
  overlays ? [ ],
  ...
}:
let
  lib = import ./lib;
  base = import ./pkgs.nix { inherit lib system config; };
  compose = final: builtins.foldl' (prev: overlay: prev // overlay final prev) (base final) overlays;
in
lib.fix compose
