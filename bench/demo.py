"""`make demo`: back up a database snapshot and the next day's snapshot into a local
repository through the `dedupe` command, restore both, compare them byte for byte, and
show what was stored. Every step prints the command it runs, so it doubles as a tour.

    python bench/demo.py --workdir .demo     # expects .demo/day1.db and .demo/day2.db
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

# The installed console script, as a user runs it (not `python -m dedupe`, which would
# import the unbuilt source tree of the checkout it runs in).
DEDUPE = os.path.join(os.path.dirname(sys.executable), "dedupe")


def dedupe(*args: str, env: dict[str, str], capture: bool = False) -> str:
    cmd = [DEDUPE, *args]
    print(f"$ dedupe {shlex.join(args)}", flush=True)
    out = subprocess.run(
        cmd, env=env, check=True, text=True, stdout=subprocess.PIPE if capture else None
    )
    return out.stdout or ""


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(".demo"))
    args = ap.parse_args()
    work = args.workdir.resolve()
    repo = work / "repo"
    settings = {"DEDUPE_REPO": str(repo), "DEDUPE_PASSWORD": "demo passphrase"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_PASSWORD")}
    env.update(settings)
    # Exactly what runs: these settings, then each command as printed (from .venv/bin).
    print("$ export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items()))
    days = [work / "day1.db", work / "day2.db"]

    dedupe("init", env=env)
    results = []
    for day in days:
        stats = json.loads(
            dedupe("backup", str(day), "--name", "demo-db", "--json", env=env, capture=True)
        )
        results.append(stats)
        print(
            f"  {day.name}: {mib(stats['bytes_read'])} read, {stats['chunks']} chunks, "
            f"{stats['chunks_new']} new, {mib(stats['bytes_stored'])} stored "
            f"({stats['bytes_read'] / max(stats['seconds'], 1e-9) / 1e6:.0f} MB/s)"
        )
    dedupe("generations", env=env)

    for day, stats in zip(days, results, strict=True):
        out = work / f"restored-{day.name}"
        dedupe("restore", stats["id"][:12], str(out), "--overwrite", env=env)
        if not filecmp.cmp(day, out, shallow=False):
            sys.exit(f"demo FAILED: {out} differs from {day}")
        print(f"  {out.name} is byte-identical to {day.name}")

    logical = sum(s["bytes_read"] for s in results)
    stored = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    print()
    print(
        f"two snapshots, {mib(logical)} of data, stored in {mib(stored)} "
        f"({logical / stored:.2f}x smaller); day 2 added {mib(results[1]['bytes_stored'])}"
    )
    print("demo OK: both generations restored and verified byte for byte")


if __name__ == "__main__":
    main()
