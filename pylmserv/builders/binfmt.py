"""Read Linux binfmt_misc and say how APE (Actually Portable Executable) files will run.

cosmocc's tools and every llamafile are APE files: they start with `MZqFpD='` (older ones
`jartsr='`), which is at once a DOS/PE header and a shell script. The kernel hands a file
to a binfmt_misc interpreter when its magic matches, so a `MZ` rule (WINE, Mono's `cli`,
binfmt-support's `run-detectors`, WSLInterop) makes APE tools start WINE instead of
running. With no rule at all, execve() fails with ENOEXEC and only a shell (which runs
the file as a script) or cosmocc's APE loader can start it.

Pure functions over a directory (default /proc/sys/fs/binfmt_misc; tests fabricate one)
returning frozen dataclasses. `pylmserv doctor` and the llamafile builder both use them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple, Union

DEFAULT_DIR = Path("/proc/sys/fs/binfmt_misc")
APE_MAGICS = (b"MZqFpD='\n", b"jartsr='\n")  # what an APE file starts with (9 bytes is enough)
SKIP_FILES = {"status", "register"}

# The states, from best to worst for running APE tools directly.
APE_REGISTERED = "ape-registered"  # an APE loader is registered and nothing else claims MZ
MZ_HIJACKED = "mz-hijacked"  # WINE/run-detectors/... would receive APE files
NO_APE_LOADER = "no-ape-loader"  # binfmt_misc works but nothing is registered for APE
UNAVAILABLE = "unavailable"  # binfmt_misc not mounted or disabled: execve gives ENOEXEC


@dataclass(frozen=True)
class BinfmtEntry:
    """One registered rule (a file in the binfmt_misc directory)."""

    name: str
    enabled: bool
    interpreter: str
    flags: str = ""
    offset: int = 0
    magic: Optional[bytes] = None
    mask: Optional[bytes] = None
    extension: Optional[str] = None

    def matches(self, header: bytes) -> bool:
        """Would the kernel hand a file starting with `header` to this rule?"""
        if self.magic is None:
            return False  # extension rules (".exe") never match an extensionless tool
        window = header[self.offset:self.offset + len(self.magic)]
        if len(window) < len(self.magic):
            return False
        mask = self.mask or b"\xff" * len(self.magic)
        return all((w & m) == (g & m) for w, m, g in zip(window, mask, self.magic))

    @property
    def is_ape_loader(self) -> bool:
        """An interpreter that runs APE files natively (cosmo's `ape` loader)."""
        base = os.path.basename(self.interpreter)
        return base == "ape" or base.startswith("ape-") or base.startswith(".ape")

    @property
    def kind(self) -> str:
        base = os.path.basename(self.interpreter).lower()
        for word in ("wine", "run-detectors", "mono", "cli", "wslinterop", "init"):
            if word in base or word in self.name.lower():
                return "wine" if word == "wine" else word
        return "ape" if self.is_ape_loader else "other"


@dataclass(frozen=True)
class BinfmtReport:
    directory: Path
    state: str  # APE_REGISTERED | MZ_HIJACKED | NO_APE_LOADER | UNAVAILABLE
    mounted: bool
    enabled: bool
    entries: Tuple[BinfmtEntry, ...] = ()
    ape_loaders: Tuple[BinfmtEntry, ...] = ()  # enabled rules that run APE files natively
    hijackers: Tuple[BinfmtEntry, ...] = ()  # enabled rules that would take APE files elsewhere
    summary: str = ""
    fix: Tuple[str, ...] = field(default_factory=tuple)  # exact commands that make APE run directly

    @property
    def direct_exec_ok(self) -> bool:
        """Can an APE tool (and whatever it execs) be started with a plain execve()?"""
        return self.state == APE_REGISTERED


def parse_entry(name: str, text: str) -> BinfmtEntry:
    """Parse the text of /proc/sys/fs/binfmt_misc/<name>."""
    enabled, interp, flags, offset, magic, mask, ext = False, "", "", 0, None, None, None
    for raw in text.splitlines():
        line = raw.strip()
        if line in ("enabled", "disabled"):
            enabled = line == "enabled"
        elif line.startswith("interpreter "):
            interp = line[len("interpreter "):].strip()
        elif line.startswith("flags:"):
            flags = line[len("flags:"):].strip()
        elif line.startswith("offset "):
            offset = int(line.split()[1])
        elif line.startswith("magic "):
            magic = bytes.fromhex(line.split()[1])
        elif line.startswith("mask "):
            mask = bytes.fromhex(line.split()[1])
        elif line.startswith("extension "):
            ext = line.split(None, 1)[1]
    return BinfmtEntry(name, enabled, interp, flags, offset, magic, mask, ext)


def read_binfmt(directory: Union[str, Path, None] = None, loader_hint: Optional[str] = None) -> BinfmtReport:
    """Read the binfmt_misc directory and judge how APE files will be run.

    `loader_hint` (e.g. the store's cosmocc bin/ape-x86_64.elf) is named in the fix."""
    directory = Path(directory) if directory is not None else DEFAULT_DIR
    status = directory / "status"
    try:
        status_text = status.read_text().strip()
    except OSError:
        return _report(directory, UNAVAILABLE, False, False, (), (), (), loader_hint)
    enabled = status_text == "enabled"
    entries = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        names = []
    for name in names:
        if name in SKIP_FILES:
            continue
        try:
            entries.append(parse_entry(name, (directory / name).read_text()))
        except (OSError, ValueError):
            continue  # unreadable or odd entry: ignore, it cannot be judged
    entries = tuple(entries)
    if not enabled:
        return _report(directory, UNAVAILABLE, True, False, entries, (), (), loader_hint)
    live = [e for e in entries if e.enabled and any(e.matches(m) for m in APE_MAGICS)]
    loaders = tuple(e for e in live if e.is_ape_loader)
    hijackers = tuple(e for e in live if not e.is_ape_loader)
    # The kernel tries the most recently registered rule first, and a directory listing
    # does not tell that order: any other rule that matches may win, so it counts as a hijack.
    if hijackers:
        state = MZ_HIJACKED
    elif loaders:
        state = APE_REGISTERED
    else:
        state = NO_APE_LOADER
    return _report(directory, state, True, True, entries, loaders, hijackers, loader_hint)


def _report(directory, state, mounted, enabled, entries, loaders, hijackers, loader_hint) -> BinfmtReport:
    fix = []
    reg = directory / "register"
    loader = loader_hint or "ape-$(uname -m).elf from cosmocc's bin/ (or https://cosmo.zip/pub/cosmos/bin/)"
    install = [f"sudo cp {loader} /usr/bin/ape && sudo chmod 755 /usr/bin/ape"] if loader_hint else \
              [f"sudo install -m 755 <{loader}> /usr/bin/ape"]
    register = [f"sudo sh -c \"echo ':APE:M::MZqFpD::/usr/bin/ape:' > {reg}\"",
                f"sudo sh -c \"echo ':APE-jart:M::jartsr::/usr/bin/ape:' > {reg}\""]
    if state == MZ_HIJACKED:
        names = ", ".join(f"{e.name} ({e.interpreter})" for e in hijackers)
        summary = f"binfmt_misc hands APE files to {names}: cosmocc's tools would start that instead of running"
        for e in hijackers:
            fix.append(f"sudo sh -c 'echo 0 > {directory / e.name}'   # disable {e.name} until reboot")
            if "run-detectors" in e.interpreter or e.kind in ("wine", "cli", "mono"):
                fix.append(f"sudo update-binfmts --disable {e.name}   # keep it disabled across reboots (binfmt-support)")
        if not loaders:
            fix += install + register
    elif state == APE_REGISTERED:
        summary = "APE loader registered: " + ", ".join(f"{e.name} -> {e.interpreter}" for e in loaders)
    elif state == NO_APE_LOADER:
        summary = "no binfmt_misc rule for APE files: they run only through a shell or the APE loader"
        fix += install + register
    elif mounted:
        summary = "binfmt_misc is disabled: APE files run only through a shell or the APE loader"
        fix += [f"sudo sh -c 'echo 1 > {directory / 'status'}'"] + install + register
    else:
        summary = f"binfmt_misc is not mounted at {directory}: APE files run only through a shell or the APE loader"
        fix += [f"sudo mount -t binfmt_misc binfmt_misc {directory}"] + install + register
    return BinfmtReport(directory=directory, state=state, mounted=mounted, enabled=enabled, entries=tuple(entries),
                        ape_loaders=tuple(loaders), hijackers=tuple(hijackers), summary=summary, fix=tuple(fix))


def is_ape(path: Union[str, Path]) -> bool:
    """Does this file start with an APE header?"""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return any(head == m[:len(head)] and len(head) == len(m) for m in APE_MAGICS)
