# `import nixpkgs { system; config; overlays; }`, as with the real thing: overlays are
# applied as a fixpoint (final, prev), so overlay packages see each other and the base.
{
  system ? builtins.currentSystem or "x86_64-linux",
  config ? { },
  overlays ? [ ],
  ...
}:
let
  lib = import ./lib.nix;
  base = import ./pkgs.nix { inherit lib system config; };
  compose = final: builtins.foldl' (prev: overlay: prev // overlay final prev) (base final) overlays;
in
lib.fix compose
