"""cosmocc (the Cosmopolitan toolchain llamafile is built with) as a locked toolchain.

The lock pins the release zip (flat sha256, `[sources.cosmocc-X_Y_Z]`, `version = "X.Y.Z"`).
It is downloaded and verified by pylmserv.sources, unzipped once per version into
`<home>/toolchains/cosmocc-<version>-<hash>`, and its executables get the exec bits the
zip lacks (4.0.2 ships bin/cosmoranlib as 0444). Nothing is ever stripped or patched:
`strip` breaks APE binaries, and the file contents stay exactly those of the zip.
"""
from __future__ import annotations

import json
import os
import platform
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from ..core.archive import extract
from ..core.errors import ConfigError, VerificationError
from ..core.flock import FileLock
from ..core.fsutil import atomic_write_text, remove_no_follow, walk_no_follow
from ..core.hashing import Hash
from ..core.log import get_logger
from ..pins.config import Lock, LockEntry
from ..store.layout import ensure_home, home, subdir, toolchains_dir
from ..store.trees import ensure_source

log = get_logger("pylmserv.cosmocc")

# Magic numbers of files that are meant to be run: APE, ELF, Mach-O, scripts.
EXEC_MAGICS = (b"MZqFpD", b"jartsr", b"\x7fELF", b"#!", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")


@dataclass(frozen=True)
class Cosmocc:
    """An unpacked, verified cosmocc in the store."""

    version: str
    root: Path
    zip_hash: Hash
    fixed_modes: Tuple[str, ...] = ()  # files that got an exec bit the zip did not give them

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def make(self) -> Path:
        return self.bin / "make"

    def loader(self, machine: Optional[str] = None) -> Path:
        """cosmocc's APE loader for this CPU (bin/ape-x86_64.elf, bin/ape-aarch64.elf)."""
        m = (machine or platform.machine()).lower()
        m = {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)
        return self.bin / f"ape-{m}.elf"


def find_entry(lock: Lock, version: str) -> LockEntry:
    """The lock's cosmocc entry for `version` (by its `version` field, else its name)."""
    for name, entry in sorted(lock.sources.items()):
        if name.startswith("cosmocc") and str(entry.get("version", "")) == version:
            return entry
    wanted = "cosmocc-" + version.replace(".", "_")
    entry = lock.sources.get(wanted)
    if entry is not None:
        return entry
    have = sorted(str(e.get("version", n)) for n, e in lock.sources.items() if n.startswith("cosmocc"))
    raise ConfigError(f"no cosmocc {version} in {lock.path}" + (f" (locked: {', '.join(have)})" if have else ""),
                      hint=f"Add [sources.{wanted}] (type = \"url\", the release zip) to pylmserv.toml and run "
                           f"`pylmserv prefetch {wanted}`.")


def toolchain_dir(entry: LockEntry, root: Optional[Path] = None) -> Path:
    """Where `entry`'s cosmocc is (or will be) unpacked: keyed by version and zip hash."""
    version = str(entry.get("version") or entry.name)
    return toolchains_dir(Path(root) if root else home()) / f"cosmocc-{version}-{entry.hash.nix32[:12]}"


def ensure_cosmocc(entry: LockEntry, root: Optional[Path] = None) -> Cosmocc:
    """Download + verify the zip (once), unzip it (once per version), fix exec bits."""
    root = Path(root) if root else ensure_home()
    if entry.mode != "flat":
        raise ConfigError(f"[sources.{entry.name}] must be a flat (unpack = false) pin of the cosmocc zip",
                          hint=f"Set unpack = false for it in pylmserv.toml and run `pylmserv prefetch --refresh {entry.name}`.")
    target = toolchain_dir(entry, root)
    version = str(entry.get("version") or entry.name)
    marker = _marker(target)
    if target.is_dir() and marker.is_file():
        return _load(entry, target, marker)
    with FileLock(subdir("tmp", root) / f"{target.name}.lock", timeout=3600):
        if target.is_dir() and marker.is_file():
            return _load(entry, target, marker)

        zip_path = ensure_source(entry, root)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent if target.parent.is_dir()
                                        else _mkdir(target.parent)))
        try:
            tree = _unzip(zip_path, staging / "tree")
            fixed = fix_exec_bits(tree)
            if not (tree / "bin").is_dir():
                raise VerificationError(f"{entry.url}: no bin/ directory in the zip; this is not a cosmocc release",
                                        hint=f"Check [sources.{entry.name}] in pylmserv.toml points at cosmocc-X.Y.Z.zip.")
            if os.path.lexists(target):
                remove_no_follow(target)  # a half-finished earlier unpack (no marker)
            os.replace(tree, target)
        finally:
            _remove_quietly(staging)

        atomic_write_text(marker, json.dumps({"version": version, "zip": entry.hash.sri, "url": entry.url,
                                              "fixed_modes": fixed}, indent=2, sort_keys=True) + "\n")
    for rel in fixed:
        log.info("cosmocc %s: %s had no exec bit in the zip; set it", version, rel)
    return Cosmocc(version, target, entry.hash, tuple(fixed))


def fix_exec_bits(tree: Path) -> List[str]:
    """Give every regular file that starts with an executable magic the exec bits its read
    bits allow (0444 -> 0555, 0644 -> 0755). Returns the relative paths changed, sorted."""
    fixed = []
    for dirpath, _dirs, files in walk_no_follow(tree):  # iterative: a tree of any depth
        for name in files:
            path = Path(dirpath) / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            want = mode | ((mode & 0o444) >> 2)  # r -> x, per class
            if want == mode or not (mode & 0o444):
                continue
            with open(path, "rb") as f:
                head = f.read(8)
            if head.startswith(EXEC_MAGICS):
                os.chmod(path, want)
                fixed.append(str(path.relative_to(tree)))
    return sorted(fixed)


def _unzip(zip_path: Path, dest: Path) -> Path:
    """Unpack with the zip's own modes (pylmserv.archive keeps exec bits, refuses unsafe paths),
    then restore the exact permission bits the zip records (e.g. 0444) before fixing them."""
    import zipfile


    extract(zip_path, dest, policy="data")
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            mode = (info.external_attr >> 16) & 0o777
            path = dest / info.filename
            if mode and not info.is_dir() and path.is_file() and not path.is_symlink():
                os.chmod(path, mode)
    return dest


def _load(entry: LockEntry, target: Path, marker: Path) -> Cosmocc:
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        doc = {}
    if doc.get("zip") not in (None, entry.hash.sri):
        raise VerificationError(f"{target} was unpacked from {doc.get('zip')}, the lock says {entry.hash.sri}",
                                hint=f"Remove {target} and rerun.")
    return Cosmocc(str(entry.get("version") or entry.name), target, entry.hash, tuple(doc.get("fixed_modes", ())))


def _marker(target: Path) -> Path:
    # Beside the tree, not in it: the tree holds exactly what the zip holds.
    return target.with_name(target.name + ".json")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _remove_quietly(path: Path) -> None:
    try:
        remove_no_follow(path)
    except OSError:
        pass
