"""Stand-ins for GPU tools that cannot run here (no GPU, no ROCm, no Vulkan driver).

Each function writes an executable script named like the real tool into a bin dir; the
script prints output in the real tool's format (formats taken from real runs posted in
upstream issues: nvidia-smi 550.x, nvcc 12.x/13.0 (13.0 copied from the real nvcc on the
dev machine), rocminfo (ROCm 6.x), hipcc 6.2, vulkaninfo --summary 1.3, glslc). They are
stand-ins, used only where the real tool cannot exist on a test machine, and the tests
that use them say so in their names.
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
import textwrap
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

# (name, compute capability, memory MiB)
RTX_3090 = ("NVIDIA GeForce RTX 3090", "8.6", 24576)
GTX_1080 = ("NVIDIA GeForce GTX 1080", "6.1", 8192)
H100 = ("NVIDIA H100 80GB HBM3", "9.0", 81559)

# nvcc --list-gpu-arch of real releases (one per line in the real output).
NVCC_ARCHES = {
    "12.4": [50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90],
    "13.0": [75, 80, 86, 87, 88, 89, 90, 100, 110, 103, 120, 121],
}
NVCC_BUILDS = {
    "12.4": ("Thu_Mar_28_02:18:24_PDT_2024", "V12.4.131", "cuda_12.4.r12.4/compiler.34097967_0", "2024"),
    "13.0": ("Wed_Aug_20_01:58:59_PM_PDT_2025", "V13.0.88", "cuda_13.0.r13.0/compiler.36424714_0", "2025"),
}


def _write(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n# STAND-IN for `{name}` (tests only): prints the real tool's output format.\n"
                    + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def nvidia_smi(bin_dir: Path, gpus: Sequence[Tuple[str, str, int]] = (RTX_3090,), driver: str = "550.54.14",
               cuda: str = "12.4", broken: bool = False) -> Path:
    """`nvidia-smi` (banner table) and `nvidia-smi --query-gpu=...--format=csv[,noheader]`.

    broken=True: the driver is not loaded (the real message and exit status 9).
    """
    data = repr({"gpus": list(gpus), "driver": driver, "cuda": cuda, "broken": broken})
    return _write(bin_dir, "nvidia-smi", f'''
        import sys
        cfg = {data}
        args = sys.argv[1:]
        if cfg["broken"]:
            print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                  "Make sure that the latest NVIDIA driver is installed and running.")
            print()
            sys.exit(9)
        query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")), None)
        fmt = next((a.split("=", 1)[1] for a in args if a.startswith("--format=")), "")
        if query is not None:
            fields = [f.strip() for f in query.split(",")]
            for i, (name, cap, mem) in enumerate(cfg["gpus"]):
                values = {{"name": name, "compute_cap": cap, "driver_version": cfg["driver"],
                           "memory.total": f"{{mem}} MiB", "index": str(i),
                           "pci.bus_id": f"00000000:{{i + 1:02X}}:00.0"}}
                for f in fields:
                    if f not in values:
                        print(f'Field "{{f}}" is not a valid field to query.')
                        print()
                        sys.exit(2)
                if i == 0 and "noheader" not in fmt:
                    print(", ".join(f if f != "memory.total" else "memory.total [MiB]" for f in fields))
                print(", ".join(values[f] for f in fields))
            sys.exit(0)
        if args:
            print(f"Unknown option {{args[0]}}", file=sys.stderr)
            sys.exit(2)
        print("Tue Mar 12 10:21:33 2024       ")
        print("+-----------------------------------------------------------------------------------------+")
        print(f"| NVIDIA-SMI {{cfg['driver']:<23}}Driver Version: {{cfg['driver']:<15}}CUDA Version: {{cfg['cuda']:<9}}|")
        print("|-----------------------------------------+------------------------+----------------------+")
        print("| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |")
        print("| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |")
        print("|                                         |                        |               MIG M. |")
        print("|=========================================+========================+======================|")
        for i, (name, cap, mem) in enumerate(cfg["gpus"]):
            print(f"| {{i:>3}}  {{name[:30]:<31}}Off |   00000000:{{i + 1:02X}}:00.0  On |                  N/A |")
            print(f"|  0%   45C    P8             25W /  350W |     512MiB / {{mem:>6}}MiB |      2%      Default |")
            print("|                                         |                        |                  N/A |")
            print("+-----------------------------------------+------------------------+----------------------+")
        print("                                                                                         ")
        print("+-----------------------------------------------------------------------------------------+")
        print("| Processes:                                                                              |")
        print("|  GPU   GI   CI        PID   Type   Process name                            GPU Memory |")
        print("|        ID   ID                                                             Usage      |")
        print("|=========================================================================================|")
        print("|  No running processes found                                                             |")
        print("+-----------------------------------------------------------------------------------------+")
    ''')


def nvcc(bin_dir: Path, release: str = "12.4") -> Path:
    """`nvcc --version`, `--list-gpu-arch`, `--list-gpu-code` as the real release prints them."""
    built, full, build, year = NVCC_BUILDS[release]
    data = repr({"release": release, "built": built, "full": full, "build": build, "year": year,
                       "arches": NVCC_ARCHES[release]})
    return _write(bin_dir, "nvcc", f'''
        import sys
        cfg = {data}
        args = sys.argv[1:]
        if "--version" in args or "-V" in args:
            print("nvcc: NVIDIA (R) Cuda compiler driver")
            print(f"Copyright (c) 2005-{{cfg['year']}} NVIDIA Corporation")
            print(f"Built on {{cfg['built']}}")
            print(f"Cuda compilation tools, release {{cfg['release']}}, {{cfg['full']}}")
            print(f"Build {{cfg['build']}}")
        elif "--list-gpu-arch" in args:
            print("\\n".join(f"compute_{{a}}" for a in cfg["arches"]))
        elif "--list-gpu-code" in args:
            print("\\n".join(f"sm_{{a}}" for a in cfg["arches"]))
        else:
            print("nvcc fatal   : No input files specified; use option --help for more information", file=sys.stderr)
            sys.exit(1)
    ''')


def rocminfo(bin_dir: Path, gpus: Sequence[Tuple[str, str]] = (("gfx1100", "Radeon RX 7900 XTX"),),
             cpu: str = "AMD Ryzen 9 5950X 16-Core Processor") -> Path:
    """`rocminfo`: HSA system attributes, a CPU agent, then one agent per GPU."""
    data = repr({"gpus": list(gpus), "cpu": cpu})
    return _write(bin_dir, "rocminfo", f'''
        cfg = {data}
        print("ROCk module is loaded")
        print("=====================")
        print("HSA System Attributes")
        print("=====================")
        print("Runtime Version:         1.14")
        print("Runtime Ext Version:     1.6")
        print("System Timestamp Freq.:  1000.000000MHz")
        print("Sig. Max Wait Duration:  18446744073709551615 (0xFFFFFFFFFFFFFFFF) (timestamp count)")
        print("Machine Model:           LARGE")
        print("System Endianness:       LITTLE")
        print("Mwaitx:                  DISABLED")
        print("DMAbuf Support:          YES")
        print()
        print("==========")
        print("HSA Agents")
        print("==========")
        agents = [(cfg["cpu"], cfg["cpu"], "CPU", "CPU")] + [(g, m, "AMD", "GPU") for g, m in cfg["gpus"]]
        for n, (name, marketing, vendor, kind) in enumerate(agents, 1):
            print("*******")
            print(f"Agent {{n}}")
            print("*******")
            print(f"  Name:                    {{name}}")
            print(f"  Uuid:                    {{'CPU-XX' if kind == 'CPU' else 'GPU-398a3f843a14660' + str(n)}}")
            print(f"  Marketing Name:          {{marketing}}")
            print(f"  Vendor Name:             {{vendor}}")
            print(f"  Feature:                 {{'None specified' if kind == 'CPU' else 'KERNEL_DISPATCH'}}")
            print(f"  Profile:                 {{'FULL_PROFILE' if kind == 'CPU' else 'BASE_PROFILE'}}")
            print("  Float Round Mode:        NEAR")
            print(f"  Node:                    {{n - 1}}")
            print(f"  Device Type:             {{kind}}")
            if kind == "GPU":
                print("  ISA Info:")
                print("    ISA 1")
                print(f"      Name:                    amdgcn-amd-amdhsa--{{name}}")
        print("*** Done ***")
    ''')


def hipcc(bin_dir: Path, hip_version: str = "6.2.41133-dd7f95766") -> Path:
    """`hipcc --version` as ROCm 6.2 prints it."""
    return _write(bin_dir, "hipcc", f'''
        import sys
        if "--version" in sys.argv:
            print("HIP version: {hip_version}")
            print("AMD clang version 18.0.0git (https://github.com/RadeonOpenCompute/llvm-project roc-6.2.0 24292 "
                  "26466ce804ac523b398608f17388eb6d605a3f09)")
            print("Target: x86_64-unknown-linux-gnu")
            print("Thread model: posix")
            print("InstalledDir: /opt/rocm-6.2.0/lib/llvm/bin")
            print("Configuration file: /opt/rocm-6.2.0/lib/llvm/bin/clang++.cfg")
        else:
            sys.exit(1)
    ''')


def vulkaninfo(bin_dir: Path, devices: Iterable[Tuple[str, str, str]] = (
        ("NVIDIA GeForce RTX 3090", "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU", "0x10de"),)) -> Path:
    """`vulkaninfo --summary` (Vulkan Instance Version 1.3.x, a Devices section)."""
    data = repr({"devices": list(devices)})
    return _write(bin_dir, "vulkaninfo", f'''
        cfg = {data}
        print("==========")
        print("VULKANINFO")
        print("==========")
        print()
        print("Vulkan Instance Version: 1.3.275")
        print()
        print()
        print("Devices:")
        print("========")
        for i, (name, kind, vendor) in enumerate(cfg["devices"]):
            print(f"GPU{{i}}:")
            print("        apiVersion         = 1.3.277")
            print("        driverVersion      = 550.54.14.0")
            print(f"        vendorID           = {{vendor}}")
            print("        deviceID           = 0x2204")
            print(f"        deviceType         = {{kind}}")
            print(f"        deviceName         = {{name}}")
            print("        driverID           = DRIVER_ID_NVIDIA_PROPRIETARY")
            print("        driverName         = NVIDIA")
            print("        driverInfo         = 550.54.14")
            print("        conformanceVersion = 1.3.7.2")
    ''')


def glslc(bin_dir: Path) -> Path:
    return _write(bin_dir, "glslc", '''
        import sys
        if "--version" in sys.argv:
            print("shaderc v2023.8 v2024.0")
            print("spirv-tools v2024.1 v2023.6-53-g7c5eea9b")
            print("glslang 11.1.0-977-ga5fcb0f5")
            print()
            print("Target: SPIR-V 1.0")
        else:
            print("glslc: error: no input files", file=sys.stderr)
            sys.exit(1)
    ''')


# What a stand-in PATH keeps of this machine: shells, compilers, git, Nix - never a GPU
# toolkit (nvcc, hipcc, glslc, vulkaninfo, rocminfo, nvidia-smi may all be installed here).
SYSTEM_TOOLS = ("sh", "bash", "env", "cat", "uname", "python3", "git", "make", "cc", "c++", "gcc", "g++",
                "ccache", "zip", "unzip", "nix", "nix-build", "nix-store", "nix-instantiate", "nix-prefetch-url")
GPU_TOOLS = ("nvcc", "nvidia-smi", "hipcc", "hipconfig", "rocminfo", "rocm-smi", "glslc", "vulkaninfo")


def system_bin(root: Path) -> Path:
    """root/sysbin: links to SYSTEM_TOOLS as found on this machine's PATH, nothing else."""
    sysbin = Path(root) / "sysbin"
    sysbin.mkdir(parents=True, exist_ok=True)
    for name in SYSTEM_TOOLS:
        found = sys.executable if name == "python3" else shutil.which(name)
        if found and not (sysbin / name).exists():
            os.symlink(os.path.realpath(found), sysbin / name)
    return sysbin


def path_with(*dirs: Path, base: Optional[str] = None) -> str:
    """A PATH of the given dirs, then `base`, else links to this machine's SYSTEM_TOOLS (made
    beside the first dir): a GPU tool installed on this machine never leaks into a stand-in test."""
    if base is None:
        if not dirs:
            raise ValueError("path_with needs a dir (its parent holds the system tool links) or base=")
        base = str(system_bin(Path(dirs[0]).parent))
    return os.pathsep.join([str(d) for d in dirs] + [base])


def llama_server(bin_dir: Path) -> Path:
    """A stand-in `llama-server` for serve's lifecycle tests (the real one is exercised by the
    slow end-to-end test). It speaks the real endpoints' shapes: GET /health answers 503
    {"error": {"code": 503, "message": "Loading model", ...}} while "loading", then 200
    {"status": "ok"}; POST /completion answers {"content": ...}. Behaviour knobs (env):

      STANDIN_RECORD=FILE       write {"argv", "pid", "child", "polls_503"} as JSON (updated live)
      STANDIN_LOAD_SECONDS=S    answer 503 for S seconds first
      STANDIN_SPAWN_CHILD=1     start a child process (to prove the whole group is stopped)
      STANDIN_IGNORE_TERM=1     ignore SIGINT/SIGTERM (to prove SIGKILL escalation)
      STANDIN_EXIT_EARLY=N      print a load error and exit N before listening

    Router mode (no -m, `--models-preset FILE`, as llama-server since Dec 2025): the preset's
    text and the environment's LLAMA_CACHE are recorded ("preset", "llama_cache"), and
    GET /models lists the preset's sections, those with load-on-startup = true as loaded
    (STANDIN_FAIL_MODEL=NAME: that one as failed, exit code 1).
    """
    return _write(bin_dir, "llama-server", '''
        import json, os, signal, subprocess, sys, threading, time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        args = sys.argv[1:]
        def opt(name, default=None):
            return args[args.index(name) + 1] if name in args else default

        record = os.environ.get("STANDIN_RECORD")
        state = {"argv": sys.argv, "pid": os.getpid(), "child": None, "polls_503": 0, "requests": []}
        def save():
            if record:
                tmp = record + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(state, f)
                os.replace(tmp, record)

        early = os.environ.get("STANDIN_EXIT_EARLY")
        if early:
            print("llama_model_load: error loading model: tensor 'token_embd.weight' not found", flush=True)
            print("main: exiting due to model loading error", flush=True)
            save()
            sys.exit(int(early))
        if os.environ.get("STANDIN_SPAWN_CHILD"):
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            state["child"] = child.pid
        if os.environ.get("STANDIN_IGNORE_TERM"):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            def stop(signum, frame):
                print(f"srv    operator(): operator(): cleaning up before exit...", flush=True)
                os._exit(0)
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGTERM, stop)
        ready_at = time.monotonic() + float(os.environ.get("STANDIN_LOAD_SECONDS", "0"))
        preset = opt("--models-preset")
        sections = {}
        if preset:
            state["preset"] = open(preset).read()
            state["llama_cache"] = os.environ.get("LLAMA_CACHE")
            name = None
            for line in state["preset"].splitlines():
                line = line.strip()
                if line.startswith("[") and line.endswith("]"):
                    name = line[1:-1]
                    sections[name] = {}
                elif "=" in line and name and not line.startswith(";"):
                    k, v = (x.strip() for x in line.split("=", 1))
                    sections[name][k] = v
        key = opt("--api-key") or os.environ.get("LLAMA_API_KEY")  # the real server reads both

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass
            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            def do_GET(self):
                if self.path == "/health":
                    if time.monotonic() < ready_at:
                        state["polls_503"] += 1
                        save()
                        return self.reply(503, {"error": {"code": 503, "message": "Loading model",
                                                          "type": "unavailable_error"}})
                    return self.reply(200, {"status": "ok"})
                if self.path in ("/models", "/v1/models") and preset:
                    return self.reply(200, {"object": "list", "data": [
                        {"id": n, "object": "model", "path": opts.get("model"),
                         "status": {"value": "unloaded", "failed": True, "exit_code": 1}
                         if n == os.environ.get("STANDIN_FAIL_MODEL") else
                         {"value": "loaded" if opts.get("load-on-startup") == "true" else "unloaded"}}
                        for n, opts in sections.items() if n != "*"]})
                self.reply(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)) or 0)
                if key and self.headers.get("Authorization") != "Bearer " + key:
                    return self.reply(401, {"error": {"code": 401, "message": "Invalid API Key",
                                                      "type": "authentication_error"}})
                state["requests"].append(json.loads(body or b"{}"))
                save()
                self.reply(200, {"content": " once upon a time", "stop": True})

        httpd = ThreadingHTTPServer((opt("--host", "127.0.0.1"), int(opt("--port", "8080"))), Handler)
        save()
        print(f"main: server is listening on http://{opt('--host')}:{opt('--port')} - starting the main loop",
              flush=True)
        httpd.serve_forever()
    ''')


def xcode(bin_dir: Path, developer_dir: str = "/Applications/Xcode.app/Contents/Developer",
          metal: bool = True) -> Tuple[Path, Path]:
    """`xcode-select -p` and `xcrun --find metal` as macOS prints them (Command Line Tools
    alone have no `metal`: xcrun's real error and exit status 72)."""
    sel = _write(bin_dir, "xcode-select", f'''
        import sys
        if sys.argv[1:] == ["-p"]:
            print({developer_dir!r})
        else:
            sys.exit(1)
    ''')
    tool = f"{developer_dir}/Toolchains/XcodeDefault.xctoolchain/usr/bin/metal"
    run = _write(bin_dir, "xcrun", f'''
        import sys
        if sys.argv[1:] == ["--find", "metal"] and {metal!r}:
            print({tool!r})
        else:
            print('xcrun: error: unable to find utility "metal", not a developer tool or in PATH', file=sys.stderr)
            sys.exit(72)
    ''')
    return sel, run


def ape_llamafile(bin_dir: Path) -> Path:
    """A stand-in llamafile: like a real APE it starts with `MZqFpD='` (a DOS header that is
    also a shell assignment), has no #! line, and runs as a shell script. Here the script
    execs the stand-in llama-server, dropping llamafile's --server/--nobrowser."""
    server = llama_server(bin_dir / "inner")
    path = bin_dir / "standin.llamafile"
    bin_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"MZqFpD='\n\x00\x00binary-looking bytes, as in a real APE header\n'\n"
                     b"# STAND-IN llamafile (tests only)\n"
                     b"[ -n \"$STANDIN_RECORD\" ] && printf '%s\\n' \"$@\" > \"$STANDIN_RECORD.llamafile-args\"\n"
                     b"[ \"$1\" = --server ] && shift; [ \"$1\" = --nobrowser ] && shift\n"
                     + f"exec {server} \"$@\"\n".encode())
    path.chmod(0o755)
    return path
