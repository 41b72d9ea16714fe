"""A small llamafile-shaped source tree for fixture-based build tests.

Shaped like upstream llamafile 0.8.x where the builder depends on it:
- build/config.mk sets `COSMOCC = .cosmocc/<version>` and has the rule that runs
  build/download-cosmocc.sh for that directory; the script exits 0 when the directory
  exists and otherwise records DOWNLOAD_ATTEMPTED in the tree and fails (tests assert it
  never runs);
- every object depends on $(COSMOCC); the tools used are $(COSMOCC)/bin/cosmocc,
  cosmoranlib (0444 in the fixture zip) and zipobj (APE-shaped);
- `make install PREFIX=...` installs llamafile, zipalign and llamafiler to PREFIX/bin;
- llamafile/cuda.c has upstream's {"/zip/...", "name"} table of GPU sources.
Served as a tarball on 127.0.0.1 and locked with its NAR hash like the real source.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Dict

CONFIG_MK = """\
# llamafile-shaped fixture (pylmserv tests)
PREFIX = /usr/local
COSMOCC = .cosmocc/{version}
TOOLCHAIN = $(COSMOCC)/bin/cosmo
CC = $(TOOLCHAIN)cc
RANLIB = $(COSMOCC)/bin/cosmoranlib
ZIPOBJ = $(COSMOCC)/bin/zipobj
INSTALL = install

.PHONY: all
all: o//

.cosmocc/{version}:
\tbuild/download-cosmocc.sh $@ {version} 0000000000000000000000000000000000000000000000000000000000000000
"""

MAKEFILE = """\
SHELL = /bin/sh
MAKEFLAGS += --no-builtin-rules
.SUFFIXES:
.DELETE_ON_ERROR:

include build/config.mk

.PHONY: o//
o//: o//llamafile/llamafile o//llamafile/zipalign o//llamafile/server/main

o//%.o: %.c $(COSMOCC)
\t@mkdir -p $(@D)
\t$(CC) -c -o $@ $<

o//llamafile/libggml.a: o//llama.cpp/ggml.o $(COSMOCC)
\t@mkdir -p $(@D)
\tcat o//llama.cpp/ggml.o > $@
\t$(RANLIB) $@

o//llamafile/version.zip.o: llamafile/version.txt $(COSMOCC)
\t@mkdir -p $(@D)
\t$(ZIPOBJ) -a x86_64 -o $@ $<

o//llamafile/llamafile: o//llamafile/main.o o//llamafile/libggml.a o//llamafile/version.zip.o
\t$(CC) -o $@ $^

o//llamafile/zipalign: o//llamafile/zipalign.o
\t$(CC) -o $@ $^

o//llamafile/server/main: o//llamafile/server/main.o o//llamafile/libggml.a
\t$(CC) -o $@ $^

.PHONY: install
install: o//llamafile/llamafile o//llamafile/zipalign o//llamafile/server/main
\tmkdir -p $(PREFIX)/bin
\t$(INSTALL) o//llamafile/zipalign $(PREFIX)/bin/zipalign
\t$(INSTALL) o//llamafile/llamafile $(PREFIX)/bin/llamafile
\t$(INSTALL) o//llamafile/server/main $(PREFIX)/bin/llamafiler

.PHONY: clean
clean:; rm -rf o
"""

DOWNLOAD_SH = """\
#!/bin/sh
# fixture of upstream's build/download-cosmocc.sh: exits early when the directory exists
OUTPUT_DIR=${1:?OUTPUT_DIR}
if [ -d "$OUTPUT_DIR" ]; then
  exit 0
fi
echo "$*" > DOWNLOAD_ATTEMPTED
echo "download-cosmocc.sh: would download cosmocc-$2.zip from github.com (no network in tests)" >&2
exit 1
"""

CUDA_C = """\
// fixture of llamafile/cuda.c: the table of sources llamafile compiles at run time
static const struct Source {
    const char *zip;
    const char *name;
} srcs[] = {
    {"/zip/llama.cpp/ggml.h", "ggml.h"},
    {"/zip/llamafile/tinyblas.h", "tinyblas.h"},
    {"/zip/llamafile/tinyblas.cu", "tinyblas.cu"},
    {"/zip/llama.cpp/ggml-cuda.h", "ggml-cuda.h"},
    {"/zip/llama.cpp/ggml-cuda.cu", "ggml-cuda.cu"}, // must come last
};
"""


# Real CUDA, tiny: compiles with a real nvcc (no GPU needed) when one is installed.
GGML_CUDA_CU = """\
#include "ggml-cuda.h"
#include "tinyblas.h"
__global__ void ggml_fixture_scale(float *x) { x[threadIdx.x] *= 2.0f; }
extern "C" int ggml_cuda_fixture_probe(void) { return GGML_CUDA_FIXTURE; }
"""


def tree_files(version: str = "3.3.6", broken: bool = False) -> Dict[str, tuple]:
    """path -> (text, mode)."""
    main = "#error fixture: this tree is meant to fail\n" if broken else "int main() { return 0; }\n"
    return {
        "Makefile": (MAKEFILE, 0o644),
        "build/config.mk": (CONFIG_MK.format(version=version), 0o644),
        "build/download-cosmocc.sh": (DOWNLOAD_SH, 0o755),
        "llamafile/main.c": (main, 0o644),
        "llamafile/zipalign.c": ("int main() { return 0; }\n", 0o644),
        "llamafile/server/main.c": ("int main() { return 0; }\n", 0o644),
        "llamafile/version.txt": ("0.8.4\n", 0o644),
        "llamafile/cuda.c": (CUDA_C, 0o644),
        "llamafile/tinyblas.h": ("// tinyblas.h\n", 0o644),
        "llamafile/tinyblas.cu": ("// tinyblas.cu\n", 0o644),
        "llama.cpp/ggml.c": ("int ggml;\n", 0o644),
        "llama.cpp/ggml.h": ("// ggml.h\n", 0o644),
        "llama.cpp/ggml-cuda.h": ("#define GGML_CUDA_FIXTURE 42\n", 0o644),
        "llama.cpp/ggml-cuda.cu": (GGML_CUDA_CU, 0o644),
    }


def write_tree(root: Path, version: str = "3.3.6", broken: bool = False) -> Path:
    root = Path(root)
    for rel, (text, mode) in tree_files(version, broken).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(mode)
    return root


def write_tarball(path: Path, top: str = "llamafile-0.8.4", version: str = "3.3.6", broken: bool = False) -> Path:
    """The tree as GitHub serves an archive: one top-level directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, (text, mode) in sorted(tree_files(version, broken).items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size, info.mode, info.mtime = len(data), mode, 1714521600
            tar.addfile(info, io.BytesIO(data))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path
