"""A stand-in for a cosmocc release zip (the real one is on no registry reachable here).

Its bin/ tools are small shell scripts that behave like the real ones where the builder
cares:
- `bin/make`, `bin/zipobj`, `libexec/.../cc1` are shaped like APE files: they start with
  `MZqFpD='` and have no `#!` line, so execve() fails (ENOEXEC) unless binfmt_misc has an
  APE rule, while `sh FILE` runs them - exactly like real APE binaries.
- `bin/ape-x86_64.elf` / `bin/ape-aarch64.elf` stand in for the APE loader: `LOADER PROG ARGS`
  or `LOADER - PROG ARGV0 ARGS`.
- `bin/cosmocc`/`bin/cosmoc++` are `#!/bin/sh` scripts (as the real ones are): a fake
  compiler/linker whose linked outputs are APE-shaped files with a ZIP appended.
- `bin/cosmoranlib` is stored with mode 0444 (as in cosmocc 4.0.2's zip).
Every tool appends one line to $COSMOCC_FIXTURE_LOG (when set): which tool, argv, HOME,
TMPDIR, so tests can see what ran and with what environment.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Dict, Tuple

APE_HEAD = "MZqFpD='\n\n'\n"  # the shell reads MZqFpD='...' as an assignment, then the script

_LOG = 'if [ -n "$COSMOCC_FIXTURE_LOG" ]; then printf \'%s\\n\' "{tool} HOME=$HOME TMPDIR=$TMPDIR $*" >> "$COSMOCC_FIXTURE_LOG"; fi\n'

MAKE = APE_HEAD + _LOG.format(tool="make") + 'exec /usr/bin/make "$@"\n'

# `LOADER PROG ARGS` or `LOADER - PROG ARGV0 ARGS` (the real loader's two forms)
LOADER = ("#!/bin/sh\n" + _LOG.format(tool="ape-loader")
          + 'if [ "$1" = - ]; then prog="$2"; shift 3; else prog="$1"; shift; fi\nexec /bin/sh "$prog" "$@"\n')

# cosmocc OUT: -c -o X.o SRC -> an object; -o X INPUTS -> an APE-shaped executable + zip
COSMOCC = "#!/bin/sh\n" + _LOG.format(tool="cosmocc") + r'''
out=""; compile=0; inputs=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2; continue ;;
    -c) compile=1 ;;
    -*) ;;
    *) inputs="$inputs $1" ;;
  esac
  shift
done
[ -n "$out" ] || { echo "cosmocc(fixture): no -o" >&2; exit 1; }
for f in $inputs; do [ -f "$f" ] || { echo "cosmocc(fixture): error: $f: No such file" >&2; exit 1; }; done
if grep -l "#error" $inputs >/dev/null 2>&1; then echo "cosmocc(fixture): error: #error in source" >&2; exit 1; fi
if [ "$compile" = 1 ]; then
  { echo "object of:$inputs"; cat $inputs; } > "$out"
  exit 0
fi
tmpd="${TMPDIR:-/tmp}/cosmocc-fixture.$$"
mkdir -p "$tmpd/z"
cat $inputs > "$tmpd/z/linked-objects.txt"
echo "fixture" > "$tmpd/z/version.txt"
(cd "$tmpd/z" && zip -q -X ../payload.zip linked-objects.txt version.txt)
{ printf "MZqFpD='\n\n'\necho 'fake llamafile (cosmocc fixture)'\nexit 0\n"; cat "$tmpd/payload.zip"; } > "$out"
zip -qA "$out"
rm -rf "$tmpd"
chmod 755 "$out"
'''

RANLIB = "#!/bin/sh\n" + _LOG.format(tool="cosmoranlib") + "exit 0\n"
ZIPOBJ = APE_HEAD + _LOG.format(tool="zipobj") + 'out=""; while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\necho zipobj > "$out"\n'
CC1 = APE_HEAD + _LOG.format(tool="cc1") + "exit 0\n"


def fixture_files(version: str = "3.3.6") -> Dict[str, Tuple[bytes, int]]:
    """name -> (content, mode as the zip records it)."""
    return {
        "bin/make": (MAKE.encode(), 0o755),
        "bin/cosmocc": (COSMOCC.encode(), 0o755),
        "bin/cosmoc++": (COSMOCC.encode(), 0o755),
        "bin/cosmoranlib": (RANLIB.encode(), 0o444),  # the wrong mode real 4.0.2 ships
        "bin/zipobj": (ZIPOBJ.encode(), 0o755),
        "bin/ape-x86_64.elf": (LOADER.encode(), 0o755),
        "bin/ape-aarch64.elf": (LOADER.encode(), 0o755),
        "bin/ape-m1.c": (b"/* loader source for Apple silicon: not executable */\n", 0o644),
        "include/stdio.h": (b"/* cosmocc fixture */\n", 0o644),
        "lib/cosmo/libcosmo.a": (b"!<arch>\n", 0o644),
        "libexec/gcc/x86_64-linux-cosmo/14.1.0/cc1": (CC1.encode(), 0o755),
        "README.md": (f"cosmocc {version} (pylmserv test fixture)\n".encode(), 0o644),
    }


def build_cosmocc_zip(path: Path, version: str = "3.3.6") -> Path:
    """Write the fixture zip (deterministic bytes: fixed timestamps and order)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, (data, mode) in fixture_files(version).items():
            info = zipfile.ZipInfo(name, date_time=(2024, 5, 1, 0, 0, 0))
            info.external_attr = (0o100000 | mode) << 16
            info.create_system = 3
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path
