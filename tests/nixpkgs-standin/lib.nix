# The subset of nixpkgs' lib that pylmserv's Nix files use, with the same semantics.
let
  lib = rec {
    fix = f: let x = f x; in x;

    inherit (builtins) filter length elem replaceStrings concatStringsSep attrNames;

    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalAttrs = cond: as: if cond then as else { };
    optionalString = cond: s: if cond then s else "";
    last = xs: assert xs != [ ] || throw "lib.last: empty list"; builtins.elemAt xs (builtins.length xs - 1);
    toLower = replaceStrings
      [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ]
      [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
    versionOlder = v1: v2: builtins.compareVersions v2 v1 == 1;
    hasPrefix = pre: s: builtins.substring 0 (builtins.stringLength pre) s == pre;

    # lib/strings.nix: cmakeOptionType / cmakeBool / cmakeFeature.
    cmakeOptionType = type: feature: value:
      assert elem (toUpper type) [ "BOOL" "FILEPATH" "PATH" "STRING" "INTERNAL" ];
      "-D${feature}:${toUpper type}=${value}";
    cmakeBool = condition: flag:
      assert builtins.isString condition;
      assert builtins.isBool flag;
      cmakeOptionType "bool" condition (if flag then "TRUE" else "FALSE");
    cmakeFeature = feature: value:
      assert builtins.isString feature;
      assert builtins.isString value;
      cmakeOptionType "string" feature value;
    toUpper = replaceStrings
      [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ]
      [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];

    # lib/sources.nix: drop VCS dirs, editor junk and result links.
    cleanSource = src: builtins.path {
      path = src;
      name = "source";
      filter = name: type:
        let base = baseNameOf (toString name);
        in !(elem base [ ".git" ".svn" "result" ".direnv" ] || hasPrefix "result-" base || builtins.match ".*~" base != null);
    };

    # lib/customisation.nix: f.override and callPackage's missing-argument error.
    makeOverridable = f: args:
      let result = f args;
      in
      if builtins.isAttrs result then
        result // {
          override = newArgs: makeOverridable f (args // (if builtins.isFunction newArgs then newArgs args else newArgs));
        }
      else
        result;

    callPackageWith = autoArgs: fn: args:
      let
        f = if builtins.isFunction fn then fn else import fn;
        fargs = builtins.functionArgs f;
        allArgs = builtins.intersectAttrs fargs autoArgs // args;
        missing = filter (n: !fargs.${n} && !(allArgs ? ${n})) (attrNames fargs);
      in
      if missing != [ ] then
        throw "Function called without required argument(s) ${concatStringsSep ", " missing} (callPackage ${toString fn})"
      else
        makeOverridable f allArgs;

    platforms = rec {
      linux = [ "x86_64-linux" "aarch64-linux" "i686-linux" "armv7l-linux" "riscv64-linux" ];
      darwin = [ "x86_64-darwin" "aarch64-darwin" ];
      unix = linux ++ darwin;
      all = unix;
    };

    licenses = {
      mit = { spdxId = "MIT"; free = true; };
      isc = { spdxId = "ISC"; free = true; };
      asl20 = { spdxId = "Apache-2.0"; free = true; };
      unfree = { spdxId = "LicenseRef-unfree"; free = false; };
    };
  };
in
lib
