# cosmocc, the Cosmopolitan toolchain llamafile is built with: the locked release zip,
# unpacked as is. Its tools are Actually Portable Executables: stripping, patchelf or
# any other fixup would corrupt them, so fixup is off entirely.
{
  lib,
  stdenvNoCC,
  unzip,
  src, # the locked zip (flat FOD from nix/sources.nix)
  version,
}:

stdenvNoCC.mkDerivation {
  pname = "cosmocc";
  inherit version src;

  nativeBuildInputs = [ unzip ];

  # The zip has no top-level directory: unpack straight into $out.
  dontUnpack = true;
  dontConfigure = true;
  dontBuild = true;

  installPhase = ''
    runHook preInstall
    mkdir -p $out
    unzip -q $src -d $out
    # Release zips do not reliably carry unix modes; the tools are useless without +x.
    chmod -R u+w,a+rX $out
    for dir in $out/bin $out/libexec; do
      if [ -d "$dir" ]; then find "$dir" -type f -exec chmod a+x {} +; fi
    done
    runHook postInstall
  '';

  dontStrip = true;
  dontPatchELF = true;
  dontPatchShebangs = true;
  dontFixup = true;

  passthru.cosmoccVersion = version;

  meta = {
    description = "Cosmopolitan C toolchain ${version} (cosmocc), pinned by pylmserv.lock";
    homepage = "https://github.com/jart/cosmopolitan";
    # The release zip is prebuilt: Cosmopolitan libc (ISC) plus a GCC/binutils
    # toolchain (GPL-3.0-or-later; GCC's runtime under the GCC Runtime Library
    # Exception) and third-party code under permissive licenses (MIT, BSD).
    license = with lib.licenses; [ isc gpl3Plus gpl2Plus lgpl21Plus mit bsd2 ];
    sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
    # Linux until a darwin build has been seen (nixpkgs' own cosmocc is linux-only too).
    platforms = lib.platforms.linux;
  };
}
