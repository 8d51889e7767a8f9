#!/usr/bin/env python3
"""Page blobs compressed with a trained dictionary (the default, docs/FORMAT.md section
16) or without (DEDUPE_DICTIONARIES=0): the same dedupe, the same pair of page files,
alternating in one run, each step its own `python -m dedupe` process into a repository
on the disk under --workdir.

Steps per run and mode: `new` (back up DAY1 as a full into a fresh repository: with
dictionaries this includes sampling and training one), `incr` (DAY2 as an incremental:
reuses it), `check` (verify --read-data), `restore` (DAY2's generation to a file, then
fsync'd, and compared with DAY2). Reports medians of wall seconds, CPU seconds and peak
RSS per step, the stored bytes after each backup, and off/on ratios.

    .venv/bin/python bench/bench_page_dictionaries.py day1.db day2.db --workdir /var/tmp/pd
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_direct_io import (  # noqa: E402 - a sibling script, not a package
    ROOT,
    alternating,
    median_table,
    run,
    timed_restore,
    workdir_outside,
)

MODES = {"on": "1", "off": "0"}
STEPS = ("new", "incr", "check", "restore")


def stored(repo: Path) -> int:
    return sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())


def one_run(day1: Path, day2: Path, work: Path, mode: str) -> dict[str, tuple[float, ...]]:
    repo, out = work / f"repo-{mode}", work / f"restored-{mode}"
    shutil.rmtree(repo, ignore_errors=True)
    out.unlink(missing_ok=True)
    env = {
        **os.environ,
        "DEDUPE_PASSWORD": "bench",
        "DEDUPE_DICTIONARIES": MODES[mode],
        "DEDUPE_CACHE_DIR": str(work / "cache"),
        "PYTHONPATH": str(ROOT),
        "PYTHONSAFEPATH": "1",
    }
    dedupe = [sys.executable, "-m", "dedupe", "-q", "-r", str(repo)]
    run([*dedupe, "init"], env)
    got: dict[str, tuple[float, ...]] = {}
    os.sync()
    got["new"] = run([*dedupe, "backup", str(day1), "--name", "db", "--type", "full"], env)
    day1_bytes = stored(repo)
    got["incr"] = run([*dedupe, "backup", str(day2), "--name", "db"], env)
    got["bytes"] = (day1_bytes, stored(repo) - day1_bytes)
    os.sync()
    got["check"] = run([*dedupe, "verify", "--read-data"], env)
    got["restore"] = timed_restore(dedupe, "db@latest", out, env)
    if not filecmp.cmp(out, day2, shallow=False):
        sys.exit(f"{mode}: the restored file differs from {day2}")
    shutil.rmtree(repo)
    out.unlink()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("day1", type=Path, help="a page file (SQLite database)")
    ap.add_argument("day2", type=Path, help="the same database a day later")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dedupe-bench-dict"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    workdir_outside(args.workdir)
    size = args.day1.stat().st_size
    results = alternating(
        args.runs,
        list(MODES),
        lambda mode: one_run(args.day1, args.day2, args.workdir, mode),
        STEPS,
    )
    print(f"{args.day1.name} ({size / 1e6:.1f} MB) and {args.day2.name}, medians of {args.runs}")
    median_table(results, STEPS, size, ("off", "on"))
    for k, what in enumerate(("stored after day 1", "added by day 2")):
        b = {m: statistics.median(r["bytes"][k] for r in results[m]) for m in MODES}
        print(
            f"{what}: on {b['on'] / 1e6:.1f} MB, off {b['off'] / 1e6:.1f} MB, "
            f"on/off {b['on'] / b['off']:.4f}"
        )


if __name__ == "__main__":
    main()
