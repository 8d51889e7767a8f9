"""`dedupe bench` and `bench/bench_e2e.py`: throughput stage by stage and end to end, on
this machine, against restic and BorgBackup when they are installed. One harness for both.

    report = await dedupe.bench.run_bench(size=256 * 2**20, runs=3, compare=True)
    print(dedupe.bench.format_report(report))     # or report.to_dict() for JSON

Every figure is a median over `runs`; MB/s is 10**6 bytes of *input* per second; machines
are shared and noisy, so compare ratios taken within one run, never one absolute time.

- Stages (`dedupe.bench.stages`): read, chunk, hash, compress, seal and write, one thread
  each, over the same data; and the "pipeline bound" one core would sustain.
- End to end (`dedupe.bench.e2e`): new, check, unchanged, incremental, restore of day 1
  and of day 2, each its own process, for dedupe and, with `compare` or `tools`, restic
  (from a file and from standard input) and borg, in fresh repositories, interleaved;
  ratios dedupe / other within each run, then the median.
- Peak RSS and CPU time are each command's own (`dedupe.bench.measure`).
- Data (`dedupe.bench.data`): a file of yours (`data`, and `data2` its next day for the
  incremental step), else generated database-like pages and their next day.

Work directory: data, repositories and caches (default: a fresh temporary directory,
removed afterwards; never the cwd; a given one keeps the generated data for the next run).
Every command runs with a private HOME under it, without the caller's DEDUPE_* variables,
and imports this very dedupe package.
"""

from __future__ import annotations

import asyncio
import compileall
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dedupe
from dedupe.bench import e2e
from dedupe.bench.data import (
    CHANGED_FRACTION,
    DATA_SEED,
    DAY2_SEED,
    GROWN_FRACTION,
    PAGE_SIZE,
    TEXT_FRACTION,
    generate_data,
    mutate_data,
    parse_size,
)
from dedupe.bench.e2e import Env, Input
from dedupe.bench.measure import Measured, measure_command
from dedupe.bench.report import (
    DAY2_STEPS,
    STAGES,
    STEPS,
    BenchProgress,
    BenchReport,
    Ratio,
    StageReport,
    StageResult,
    StepFailed,
    StepResult,
    StepRun,
    ToolReport,
    format_report,
)
from dedupe.bench.stages import measure_stages
from dedupe.bench.tools import FAMILIES, S3_VARIABLE, VARIANTS, expand_tools

__all__ = [
    "DAY2_STEPS",
    "FAMILIES",
    "STAGES",
    "STEPS",
    "VARIANTS",
    "BenchProgress",
    "BenchReport",
    "Measured",
    "Ratio",
    "StageReport",
    "StageResult",
    "StepFailed",
    "StepResult",
    "StepRun",
    "ToolReport",
    "expand_tools",
    "format_report",
    "generate_data",
    "measure_command",
    "mutate_data",
    "parse_size",
    "run_bench",
]

MiB = 1 << 20
DEFAULT_SIZE = 256 * MiB


def child_env(workdir: Path) -> dict[str, str]:
    """The environment of every measured command: no DEDUPE_* of the caller, a private HOME
    and caches under the work directory, and this very dedupe package on the import path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    pkg_root = str(Path(dedupe.__file__).resolve().parent.parent)
    pp = env.get("PYTHONPATH")
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        LC_ALL="C.UTF-8",
        LANG="C.UTF-8",
        PYTHONPATH=pkg_root + (os.pathsep + pp if pp else ""),
    )
    return env


def _described(inp: Input, generated: bool, description: str) -> dict[str, Any]:
    return {
        "path": str(inp.path),
        "bytes": inp.size,
        "generated": generated,
        "blake3": inp.digest,
        "description": description,
    }


async def _inputs(
    data: str | os.PathLike[str] | None,
    data2: str | os.PathLike[str] | None,
    size: int,
    wdir: Path,
    say: BenchProgress,
) -> tuple[Input, Input | None, dict[str, Any]]:
    """Day 1, day 2 (None: no incremental step) and their description for the report."""
    if data is not None:
        paths = [Path(p).resolve() for p in (data, data2) if p is not None]
        for p in paths:
            if not p.is_file():
                raise ValueError(f"{p}: not a file")
        day1 = await asyncio.to_thread(Input.of, paths[0])
        day2 = await asyncio.to_thread(Input.of, paths[1]) if len(paths) > 1 else None
        info = _described(day1, False, "given file")
        info["day2"] = _described(day2, False, "given file") if day2 else None
        return day1, day2, info
    if data2 is not None:
        raise ValueError("data2 (the next day) needs data (the first day)")
    path1 = wdir / f"bench-data-{size}-seed{DATA_SEED}.db"
    path2 = wdir / f"bench-data-{size}-seed{DATA_SEED}-day2.db"
    if not path1.exists() or path1.stat().st_size != size:
        say(f"generating {size / MiB:.0f} MiB of database-like data in {path1}")
        await asyncio.to_thread(generate_data, path1, size)
        path2.unlink(missing_ok=True)  # day 2 derives from day 1
    if not path2.exists():
        await asyncio.to_thread(mutate_data, path1, path2)
    day1 = await asyncio.to_thread(Input.of, path1)
    day2 = await asyncio.to_thread(Input.of, path2)
    info = _described(
        day1,
        True,
        f"generated (seed {DATA_SEED}): {PAGE_SIZE} B pages in runs of 1-16, "
        f"{TEXT_FRACTION:.0%} text-like rows, {1 - TEXT_FRACTION:.0%} random blobs",
    )
    info["day2"] = _described(
        day2,
        True,
        f"day 1 with {CHANGED_FRACTION:.0%} of its pages rewritten and "
        f"{GROWN_FRACTION:.0%} appended (seed {DAY2_SEED})",
    )
    return day1, day2, info


async def run_bench(
    *,
    data: str | os.PathLike[str] | None = None,
    data2: str | os.PathLike[str] | None = None,
    size: int = DEFAULT_SIZE,
    runs: int = 3,
    workdir: str | os.PathLike[str] | None = None,
    compare: bool = False,
    tools: Sequence[str] = (),
    s3: str | None = None,
    stages: bool = True,
    end_to_end: bool = True,
    keep: bool = False,
    progress: BenchProgress | None = None,
) -> BenchReport:
    """Measure this machine (see the module docstring for what and how).

    `data`: a file to back up (e.g. a database snapshot), `data2` its next version (for the
    incremental step; without it there is none); without `data`, `size` bytes and their
    next day are generated. With `data`, the stage table uses at most its first `size`
    bytes. `compare`: also restic and borg (same as `tools=("restic", "borg")`); `tools`:
    families or variants to run beside dedupe (`FAMILIES`, `VARIANTS`). `s3`: an
    `s3://bucket/prefix` (the bucket must exist; endpoint and credentials from the AWS
    environment) where the variant "dedupe-s3" keeps its repositories, one prefix per run:
    dedupe on an object store beside dedupe on the local disk. `keep`: leave the
    last run's repositories in the work directory. Raises IntegrityError when dedupe
    restores wrong bytes, StepFailed when a dedupe command fails, ValueError for bad
    arguments. Cancelling stops the running command."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    if size < PAGE_SIZE:
        raise ValueError(f"size must be at least {PAGE_SIZE} bytes")
    variants = expand_tools(
        [*tools, *(("restic", "borg") if compare else ()), *(("dedupe-s3",) if s3 else ())]
    )
    say: BenchProgress = progress or (lambda _msg: None)
    own_dir = workdir is None
    wdir = Path(tempfile.mkdtemp(prefix="dedupe-bench-")) if own_dir else Path(workdir or "")
    wdir = wdir.resolve()
    wdir.mkdir(parents=True, exist_ok=True)
    try:
        day1, day2, data_info = await _inputs(data, data2, size, wdir, say)
        # The commands import dedupe from where this process does: byte-compile it once,
        # as `pip install` does, so that no measured command compiles modules from source
        # (it would whenever PYTHONDONTWRITEBYTECODE is set).
        await asyncio.to_thread(compileall.compile_dir, Path(dedupe.__file__).parent, quiet=1)
        stage_report = None
        if stages:
            stage_report = await asyncio.to_thread(
                measure_stages, str(day1.path), size, runs, wdir, say
            )
        reports: list[ToolReport] = []
        ratios: list[Ratio] = []
        if end_to_end:
            base = child_env(wdir)
            if s3:
                base[S3_VARIABLE] = s3
            env = Env(wdir, base, say, keep)
            reports, ratios = await e2e.end_to_end(day1, day2, variants, runs, env)
        notes = [
            "MB/s = 1e6 bytes of input per second; medians of the runs; ratios taken "
            "within each run",
            "end-to-end wall times include process start-up, key derivation and repository "
            "open (every tool at its defaults)",
        ]
        return BenchReport(
            when=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            host={
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
                "dedupe": dedupe.__version__,
            },
            data=data_info,
            runs=runs,
            stages=stage_report,
            tools=tuple(reports),
            ratios=tuple(ratios),
            notes=tuple(notes),
        )
    finally:
        if own_dir:
            shutil.rmtree(wdir, ignore_errors=True)
        elif not keep:
            shutil.rmtree(wdir / "runs", ignore_errors=True)
