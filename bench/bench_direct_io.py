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
from pathlib import Path

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
    wall, cpu, rss = run([*dedupe, "restore", "db@latest", str(out)], env)
    start = time.perf_counter()
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    got["restore"] = (wall + time.perf_counter() - start, cpu, rss)
    shutil.rmtree(repo)
    out.unlink()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("file", type=Path, help="the file to back up")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dedupe-bench-dio"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.workdir.resolve().is_relative_to(ROOT):
        sys.exit("--workdir must be outside the repository")
    size = args.file.stat().st_size
    results: dict[str, list[dict[str, tuple[float, float, int]]]] = {m: [] for m in MODES}
    for i in range(args.runs):
        for mode in MODES if i % 2 == 0 else reversed(MODES):
            results[mode].append(one_run(args.file, args.workdir, mode))
            r = results[mode][-1]
            print(
                f"run {i + 1} {mode}: "
                + ", ".join(f"{s} {r[s][0]:.2f} s / {r[s][1]:.2f} cpu" for s in STEPS),
                file=sys.stderr,
            )
    print(f"{args.file.name}, {size / 1e6:.1f} MB, medians of {args.runs}")
    print(f"{'step':<8} {'mode':<7} {'wall s':>7} {'cpu s':>7} {'MB/s':>7} {'peak RSS MiB':>13}")
    for step in STEPS:
        med = {}
        for mode in MODES:
            rows = [r[step] for r in results[mode]]
            med[mode] = [statistics.median(x[k] for x in rows) for k in range(3)]
            wall, cpu, rss = med[mode]
            mb_s = size / 1e6 / wall
            print(f"{step:<8} {mode:<7} {wall:>7.2f} {cpu:>7.2f} {mb_s:>7.1f} {rss / 1024:>13.0f}")
        print(
            f"{step:<8} {'ratio':<7} {med['cached'][0] / med['direct'][0]:>6.2f}x "
            f"{med['cached'][1] / med['direct'][1]:>6.2f}x   (cached / direct; > 1: direct faster)"
        )


if __name__ == "__main__":
    main()
