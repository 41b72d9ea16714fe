# Stand-in of nixpkgs' stdenv generic builder (tests only): the phases and hook rules
# pylmserv's .nix files rely on, run with the host's tools (the tests use sandbox = false).
# Like stdenv: phases run in one shell; dontUnpack/dontConfigure/dontBuild/dontInstall/
# dontFixup skip a whole phase *including its pre/post hooks*; a custom *Phase string
# replaces the default and must call runHook itself; the implicit hook (the attribute)
# runs first. Fixup does nothing here; dontStrip & co. are only recorded.
set -eu -o pipefail

PATH=""
for p in ${nativeBuildInputs:-} ${buildInputs:-}; do
  if [ -d "$p/bin" ]; then PATH="$PATH${PATH:+:}$p/bin"; fi
done
export PATH="$PATH${PATH:+:}/usr/local/bin:/usr/bin:/bin"
export NIX_BUILD_CORES="${NIX_BUILD_CORES:-1}"
export HOME=/homeless-shelter
export TMPDIR="${TMPDIR:-/tmp}"

runHook() {
  local name="$1"
  if [ -n "${!name:-}" ]; then eval "${!name}"; fi
}

stripHash() { basename "$1" | cut -c34-; }

unpackPhase() {
  runHook preUnpack
  if [ -d "$src" ]; then
    sourceRoot="$(stripHash "$src")"
    cp -pr -- "$src" "$sourceRoot"
  else
    mkdir unpack-tmp
    case "$src" in
      *.zip) unzip -q "$src" -d unpack-tmp ;;
      *) tar xf "$src" -C unpack-tmp ;;
    esac
    [ "$(ls -A unpack-tmp | wc -l)" = 1 ] || { echo "unpacker produced multiple directories" >&2; exit 1; }
    sourceRoot="$(ls -A unpack-tmp)"
    mv "unpack-tmp/$sourceRoot" .
  fi
  chmod -R u+w -- "$sourceRoot"
  runHook postUnpack
}

phase() {  # phase NAME DEFAULT-FUNCTION
  local custom="${1}Phase"
  if [ -n "${!custom:-}" ]; then eval "${!custom}"; else "$2"; fi
}

defaultPatch() { runHook prePatch; runHook postPatch; }
defaultConfigure() {
  runHook preConfigure
  if [ -x ./configure ]; then ./configure --prefix="$out"; fi
  runHook postConfigure
}
defaultBuild() {
  runHook preBuild
  if [ -f Makefile ] || [ -f makefile ] || [ -f GNUmakefile ]; then
    make ${enableParallelBuilding:+-j"$NIX_BUILD_CORES"} ${makeFlags:-}
  fi
  runHook postBuild
}
defaultInstall() {
  runHook preInstall
  mkdir -p "$out"
  make install ${makeFlags:-}
  runHook postInstall
}

if [ -z "${dontUnpack:-}" ]; then phase unpack unpackPhase; cd "$sourceRoot"; fi
phase patch defaultPatch
if [ -z "${dontConfigure:-}" ]; then phase configure defaultConfigure; fi
if [ -z "${dontBuild:-}" ]; then phase build defaultBuild; fi
if [ -z "${dontInstall:-}" ]; then phase install defaultInstall; fi
if [ -z "${dontFixup:-}" ]; then runHook preFixup; runHook postFixup; fi
[ -e "$out" ] || { echo "stand-in stdenv: $name produced no \$out" >&2; exit 1; }
