#!/usr/bin/env python3
"""Packs written around the page cache (O_DIRECT, the default) or through it
(DEDUPE_DIRECT_IO=0): the same dedupe, the same file, alternating in one run, each step
its own `python -m dedupe` process into a repository on the disk under --workdir.

Steps per run and mode: `new` (back up FILE into a fresh repository), `check` (verify
--read-data straight after it: with direct writes the packs are not in the page cache
and are read from the device), `restore` (the generation to a file in --workdir, then
fsync'd by this script, as bench_e2e's "+fsync"). Reports medians of wall seconds,
CPU seconds (user+sys) and peak RSS, and cached/direct ratios of wall and CPU.

    .venv/bin/python bench/bench_direct_io.py day1.db --workdir /var/tmp/dio --runs 3

Nothing here prefaults memory (bench_e2e does, for fairness between tools): the point
is what each mode costs as it comes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = {"direct": "1", "cached": "0"}
STEPS = ("new", "check", "restore")


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall s, CPU s (user+sys) and peak RSS (KiB) of one command, which must succeed."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            said = err.read().decode(errors="replace").strip()[-500:]
            sys.exit(f"{' '.join(argv[3:])} failed ({proc.returncode}): {said}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def timed_restore(
    dedupe: list[str], spec: str, out: Path, env: dict[str, str]
) -> tuple[float, float, int]:
    """run() of a restore of `spec` to `out`, its wall time including the file's fsync
    (as bench_e2e's "+fsync")."""
    wall, cpu, rss = run([*dedupe, "restore", spec, str(out)], env)
    start = time.perf_counter()
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return wall + time.perf_counter() - start, cpu, rss


def alternating(
    runs: int, modes: list[str], once: Callable[[str], dict[str, Any]], steps: tuple[str, ...]
) -> dict[str, list[dict[str, Any]]]:
    """once(mode) for every mode, `runs` times, the order of the modes reversed every
    other run; each run's step times said on stderr as they come."""
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for i in range(runs):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            r = once(mode)
            results[mode].append(r)
            said = ", ".join(f"{s} {r[s][0]:.2f} s / {r[s][1]:.2f} cpu" for s in steps)
            print(f"run {i + 1} {mode}: {said}", file=sys.stderr)
    return results


def workdir_outside(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if path.resolve().is_relative_to(ROOT):
        sys.exit("--workdir must be outside the repository")


def one_run(source: Path, work: Path, mode: str) -> dict[str, tuple[float, float, int]]:
    repo, out = work / f"repo-{mode}", work / f"restored-{mode}"
    shutil.rmtree(repo, ignore_errors=True)
    out.unlink(missing_ok=True)
    env = {
        **os.environ,
        "DEDUPE_PASSWORD": "bench",
        "DEDUPE_DIRECT_IO": MODES[mode],
        "DEDUPE_CACHE_DIR": str(work / "cache"),
        "PYTHONPATH": str(ROOT),
        "PYTHONSAFEPATH": "1",
    }
    dedupe = [sys.executable, "-m", "dedupe", "-q", "-r", str(repo)]
    run([*dedupe, "init"], env)
    got = {}
    os.sync()
    got["new"] = run([*dedupe, "backup", str(source), "--name", "db"], env)
    os.sync()
    got["check"] = run([*dedupe, "verify", "--read-data"], env)
    os.sync()
    got["restore"] = timed_restore(dedupe, "db@latest", out, env)
    shutil.rmtree(repo)
    out.unlink()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("file", type=Path, help="the file to back up")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dedupe-bench-dio"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    workdir_outside(args.workdir)
    size = args.file.stat().st_size
    results = alternating(
        args.runs, list(MODES), lambda mode: one_run(args.file, args.workdir, mode), STEPS
    )
    print(f"{args.file.name}, {size / 1e6:.1f} MB, medians of {args.runs}")
    median_table(results, STEPS, size, ("cached", "direct"))


def median_table(
    results: dict[str, list[dict[str, Any]]],
    steps: tuple[str, ...],
    size: int,
    ratio: tuple[str, str],
) -> None:
    """Medians of wall s, CPU s, MB/s (of `size` bytes) and peak RSS per step and mode,
    and per step the ratio of mode ratio[0] to ratio[1] (> 1: ratio[1] is faster)."""
    print(f"{'step':<8} {'mode':<7} {'wall s':>7} {'cpu s':>7} {'MB/s':>7} {'peak RSS MiB':>13}")
    for step in steps:
        med = {}
        for mode, rows in results.items():
            med[mode] = [statistics.median(r[step][k] for r in rows) for k in range(3)]
            wall, cpu, rss = med[mode]
            mb_s = size / 1e6 / wall
            print(f"{step:<8} {mode:<7} {wall:>7.2f} {cpu:>7.2f} {mb_s:>7.1f} {rss / 1024:>13.0f}")
        slow, fast = med[ratio[0]], med[ratio[1]]
        print(
            f"{step:<8} {'ratio':<7} {slow[0] / fast[0]:>6.3f}x {slow[1] / fast[1]:>6.3f}x"
            f"   ({ratio[0]} / {ratio[1]}; > 1: {ratio[1]} faster)"
        )


if __name__ == "__main__":
    main()
