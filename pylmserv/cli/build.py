"""`pylmserv build [llama.cpp|llamafile]`: parse, call pylmserv.builders.build, render."""
from __future__ import annotations

from pathlib import Path

import click

from ..builders import build
from ..builders.llama_cpp import BACKENDS
from ..core.errors import UsageError
from .options import emit_json, json_option, project_command


@project_command
@click.command("build", help="Build llama.cpp (CMake, any backend) or llamafile from the locked source. "
                             "A no-op when the stamped build is up to date.")
@click.argument("what", required=False, default="llama.cpp", type=click.Choice(["llama.cpp", "llamafile"]))
@click.option("--backend", default="cpu", show_default=True, type=click.Choice(("auto",) + BACKENDS),
              help="GPU/CPU backend to build for; auto: what this machine has (prints what it chose and why).")
@click.option("--target", "targets", multiple=True, metavar="T",
              help="CMake target to build (repeatable; default llama-cli, llama-server, llama-bench).")
@click.option("--cuda-arch", metavar="LIST", help="CUDA architectures, e.g. 86 or 80;89 (default: detected GPUs).")
@click.option("--gpu-targets", metavar="LIST", help="ROCm gfx targets, e.g. gfx1100,gfx90a (default: rocminfo).")
@click.option("--portable", is_flag=True, help="No -march=native: all CPU variants, loaded at run time.")
@click.option("--reproducible/--no-reproducible", default=None,
              help="Same lock + options -> bit-identical binaries in any PYLMSERV_HOME (path maps, fixed "
                   "SOURCE_DATE_EPOCH, deterministic ar/build-id); default: on with --portable.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Parallel compile jobs (default: CPU count).")
@click.option("--prefix", type=click.Path(path_type=Path, file_okay=False),
              help="Install binaries to PREFIX/bin (default: the store, with a `current` link per backend).")
@click.option("--cmake-arg", "cmake_args", multiple=True, metavar="ARG",
              help="Extra -DNAME=VALUE for the configure step (repeatable; legacy LLAMA_* names are translated).")
@click.option("--source", "source_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Build this local llama.cpp tree instead of the locked source.")
@click.option("--force", is_flag=True, help="Configure and build even when the stamp says up to date.")
@click.option("--module-only", is_flag=True,
              help="llamafile: build only the GPU module (ggml-cuda.so / ggml-rocm.so; needs nvcc or hipcc, not cosmocc).")
@click.option("--cuda-blas", type=click.Choice(["tinyblas", "cublas"]),
              help="llamafile --backend cuda: tinyBLAS (default; no cuBLAS needed at run time) or cuBLAS.")
@click.option("--no-build", is_flag=True,
              help="With --portable: install a signed substitute from [cache] substituters or fail; never compile.")
@click.option("--dry-run", is_flag=True, help="Print detections and the exact configure/build commands; fetch and build nothing.")
@json_option()
@click.pass_obj
def command(obj, what, backend, targets, cuda_arch, gpu_targets, portable, reproducible, jobs, prefix, cmake_args,
            source_dir, force, module_only, cuda_blas, no_build, dry_run, as_json):
    import signal

    def terminated(signum, frame):
        raise KeyboardInterrupt  # unwinds the build: its steps are stopped, no stamp is written

    signal.signal(signal.SIGTERM, terminated)

    if what == "llamafile" and (targets or portable or cmake_args or reproducible is not None):
        raise UsageError("--target/--portable/--reproducible/--cmake-arg apply to llama.cpp only",
                         hint="`pylmserv build llamafile` takes --backend, --cuda-arch, --gpu-targets, --cuda-blas, "
                              "--module-only, --source, --jobs, --prefix, --force, --dry-run, --json.")
    kwargs = dict(what=what, backend=backend, targets=targets or None, cuda_arch=cuda_arch, gpu_targets=gpu_targets,
                  portable=portable, jobs=jobs, prefix=prefix, cmake_args=cmake_args, force=force, dry_run=dry_run,
                  source_dir=source_dir, config=obj.config if obj else None, lock=obj.lock if obj else None,
                  module_only=module_only, cuda_blas=cuda_blas, **({"no_build": True} if no_build else {}),
                  **({"reproducible": reproducible} if reproducible is not None else {}))
    result = build(**kwargs)
    if result.dry_run and not as_json:
        for line in result.detected:
            click.echo(f"detected: {line}", err=True)
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"build dir: {result.build_dir}", err=True)
        for line in result.commands:
            click.echo(line)  # the commands are what a dry run is for: stdout
        return
    quiet = bool(obj and obj.quiet)
    data, text = _answer(result, as_json, quiet)
    if data is not None:
        emit_json(data)
    click.echo(text, nl=False, err=True)


def _answer(result, as_json: bool, quiet: bool):
    """(the --json document or None, the text for stderr) of a build's result."""
    if as_json:
        data = result.to_json()
        if result.detected:
            data["detected"] = list(result.detected)
        return data, ""
    if quiet:
        return None, ""
    state = "up to date" if result.cache_hit else f"built in {result.seconds:.1f} s"
    lines = [f"{result.what} ({result.backend}): {state}; build dir {result.build_dir}"]
    lines += [f"  {name}: {path}" for name, path in sorted(result.binaries.items())]
    if result.current:
        lines.append(f"  current: {result.current} -> {Path(result.prefix).name}")
    return None, "".join(line + "\n" for line in lines)
