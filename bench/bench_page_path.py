#!/usr/bin/env python3
"""Chunkers side by side on one file pair: a full of day 1, an incremental of day 2, an
unchanged re-backup, a restore of the last generation and a verify --read-data, in a
process per chunker and run (in-process API, no CLI start-up), the chunkers alternating
run by run; medians of wall and CPU time. With --baseline, the same with another
checkout's code (before/after a change, one run).

    .venv/bin/python bench/bench_page_path.py day1.db day2.db            # auto vs fastcdc
    .venv/bin/python bench/bench_page_path.py day1.db day2.db --baseline ../before --runs 5
    .venv/bin/python bench/bench_page_path.py day1.tar day2.tar --chunkers auto,fastcdc

Make the pair with ../shared/data/gen_snapshot.py (sqlite, then mutate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE_RUN = """
import asyncio, json, resource, shutil, sys, tempfile, time
from pathlib import Path
from dedupe import Repository
from dedupe.crypto import KdfParams

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def prefault(directory, size):
    # On a VM that hands freed guest memory back to its host (virtio-balloon free page
    # reporting), the first writes into fresh page cache fault every page in from the
    # host: 160 MiB took 0.84 s of CPU instead of 0.035 s (measured). Writing and removing
    # as much first lets the timed backup find the memory in place, whichever runs first.
    p = Path(directory) / "prefault"
    block = bytes(1 << 22)
    try:
        with open(p, "wb") as f:
            for _ in range(size // len(block) + 1):
                f.write(block)
    finally:
        p.unlink(missing_ok=True)

async def main(chunker, day1, day2, workdir, prefault_bytes):
    d = Path(tempfile.mkdtemp(dir=workdir))
    try:
        if int(prefault_bytes):
            prefault(d, int(prefault_bytes))
        repo = await Repository.init(str(d / "r"), "pw", kdf=KdfParams.weakest(), cache=False)
        out = []
        async with repo:
            for path, kind in ((day1, "full"), (day2, "incremental"), (day2, "incremental")):
                c, t = cpu(), time.perf_counter()
                stats = await repo.backup(Path(path), name="db", kind=kind, chunker=chunker)
                out.append([time.perf_counter() - t, cpu() - c, stats.bytes_new])
            target = d / "restored"
            c, t = cpu(), time.perf_counter()
            await repo.restore(stats.id, target)
            out.append([time.perf_counter() - t, cpu() - c, 0])
            if target.read_bytes() != Path(day2).read_bytes():
                raise SystemExit("the restored file is not day 2")
            target.unlink()
            c, t = cpu(), time.perf_counter()
            report = await repo.verify(read_data=True)
            out.append([time.perf_counter() - t, cpu() - c, 0])
            if not report.ok:
                raise SystemExit("verify found damage")
        print(json.dumps(out))
    finally:
        shutil.rmtree(d)

asyncio.run(main(*sys.argv[1:6]))
"""
STEPS = ("full", "incremental", "unchanged", "restore", "verify")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("day1", type=Path)
    ap.add_argument("day2", type=Path)
    ap.add_argument("--chunkers", default="auto,fastcdc")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another checkout (built) to compare with")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    ap.add_argument(
        "--no-prefault",
        action="store_true",
        help="skip writing and removing 2x day 1's size in the work directory before each"
        " process's backups (it keeps a VM's page-cache faults out of the timings)",
    )
    args = ap.parse_args()
    trees = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    chunkers = args.chunkers.split(",")
    results: dict[tuple[Path, str], list[list[list[float]]]] = {}
    size = args.day1.stat().st_size
    for run in range(args.runs):
        combos = [(t, c) for t in trees for c in chunkers]
        for tree, chunker in combos if run % 2 == 0 else combos[::-1]:
            env = dict(os.environ, PYTHONPATH=str(tree), PYTHONSAFEPATH="1")
            argv = [sys.executable, "-c", ONE_RUN, chunker, str(args.day1), str(args.day2)]
            out = subprocess.run(
                [*argv, str(args.workdir), str(0 if args.no_prefault else 2 * size)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            results.setdefault((tree, chunker), []).append(json.loads(out.stdout))
    print(f"{size / 1e6:.0f} MB day 1, {args.runs} runs, medians (wall s / CPU s)")
    for (tree, chunker), runs in results.items():
        cells = []
        for i, step in enumerate(STEPS):
            wall = statistics.median(r[i][0] for r in runs)
            cpu = statistics.median(r[i][1] for r in runs)
            cells.append(f"{step} {wall:.2f}/{cpu:.2f}")
        new = statistics.median(r[1][2] for r in runs)
        mb = size / statistics.median(r[0][0] for r in runs) / 1e6
        tail = f"({mb:.0f} MB/s full; day 2 new {new / 1e6:.1f} MB)"
        print(f"{tree.name:>12} {chunker:8} {'  '.join(cells)}  {tail}")
    if len(trees) == 2:
        for chunker in chunkers:
            new, old = results[(trees[0], chunker)], results[(trees[1], chunker)]
            ratios = [
                statistics.median(r[i][0] for r in old) / statistics.median(r[i][0] for r in new)
                for i in range(len(STEPS))
            ]
            print(
                f"{chunker:>12} this tree / baseline throughput: "
                + ", ".join(f"{s} {x:.2f}x" for s, x in zip(STEPS, ratios, strict=True))
            )
    if len(chunkers) == 2:
        a, b = chunkers
        for tree in trees:
            ra, rb = results[(tree, a)], results[(tree, b)]
            ratios = [
                statistics.median(r[i][0] for r in rb) / statistics.median(r[i][0] for r in ra)
                for i in range(len(STEPS))
            ]
            cpu = statistics.median(r[0][1] for r in ra) / statistics.median(r[0][1] for r in rb)
            print(
                f"{tree.name:>12} {a}/{b} throughput: "
                + ", ".join(f"{s} {x:.2f}x" for s, x in zip(STEPS, ratios, strict=True))
                + f"; CPU of the full {cpu:.2f}x"
            )


if __name__ == "__main__":
    main()
