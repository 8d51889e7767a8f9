#!/usr/bin/env python3
"""What a long chain of incrementals costs the operations that expand it: an unchanged
incremental backup at the end of a chain of N incrementals (its parent's complete table
is rebuilt from the full and every delta), and a restore of the chain's last generation.

    .venv/bin/python bench/bench_chain.py                           # N = 1,30,100,300
    .venv/bin/python bench/bench_chain.py --links 1,30,245 --runs 5
    .venv/bin/python bench/bench_chain.py --code /work/head26 --code .   # two trees, one run
    .venv/bin/python bench/bench_chain.py --size 64MiB --links 1,30,100 --latency 20

The source: a SQLite-like file of --size bytes (a SQLite header, then random 4 KiB
pages; `auto` cuts it into its pages), of which --pages pages are rewritten each day.
One chain is built, through the public API, up to the largest N: a full, then one
incremental a day; the repository directory is copied aside when the chain reaches each
N (--workdir; --keep reuses the copies of an earlier run with the same parameters).

Each measurement is a fresh process that copies the repository of N links to a scratch
directory (not timed), opens it (timed apart, `open`) and then runs one operation:

- `backup`: an incremental of the chain's last day, unchanged (it must store nothing:
  `new` is the bytes it stored, always 0);
- `restore`: the chain's last generation, by its id, to a file (checked against the
  day's data after the clock stops);
- `latest` (with --latest): the same restore of `db@latest`, which lists the
  generations first.

`--code DIR` (repeatable) names the dedupe trees to measure (default: this one), each
imported through sys.path in the measuring process; with several, the processes are
interleaved run by run, so that the trees share the machine's state. `--latency MS`
adds MS milliseconds to every request the local backend serves (stat, get, list), as an
object store's round trip would. Medians of --runs; peak RSS is the largest of the
process over the runs (imports included: ~60-80 MiB of it is the interpreter and
libraries).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = "bench-chain"
PAGE = 4096


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


# --- the chain ------------------------------------------------------------------------


def first_day(size: int, seed: int) -> bytearray:
    """A SQLite-like file: the 100-byte header page (page size 4096) and random pages."""
    rng = random.Random(seed)
    pages = max(2, size // PAGE)
    data = bytearray(rng.randbytes(pages * PAGE))
    header = b"SQLite format 3\x00" + struct.pack(">H", PAGE) + bytes(82)
    data[: len(header)] = header
    return data


def next_day(data: bytearray, rng: random.Random, pages: int) -> None:
    """`pages` pages rewritten in place (never the header page)."""
    for _ in range(pages):
        p = rng.randrange(1, len(data) // PAGE)
        data[p * PAGE : (p + 1) * PAGE] = rng.randbytes(PAGE)


async def build(work: Path, links: list[int], size: int, pages: int, seed: int) -> None:
    """A full and max(links) incrementals of one name; the repository copied aside to
    work/N/ (with the day's data and the last generation's id) as the chain reaches N."""
    sys.path.insert(0, str(REPO_ROOT))
    from dedupe import Repository
    from dedupe.crypto import KdfParams

    repo_dir = work / "building"
    shutil.rmtree(repo_dir, ignore_errors=True)
    source = work / "source.db"
    rng = random.Random(seed + 1)
    data = first_day(size, seed)
    source.write_bytes(data)
    wanted = set(links)
    started = time.perf_counter()
    async with await Repository.init(
        repo_dir, PASSPHRASE, kdf=KdfParams.weakest(), cache=False
    ) as repo:
        await repo.backup(source, name="db", kind="full")
        for n in range(1, max(links) + 1):
            next_day(data, rng, pages)
            source.write_bytes(data)
            stats = await repo.backup(source, name="db", kind="incremental")
            assert stats.kind == "incremental", stats
            if n in wanted:
                dest = work / str(n)
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(repo_dir, dest / "repo")
                shutil.copyfile(source, dest / "source.db")
                (dest / "last.json").write_text(
                    json.dumps(
                        {
                            "id": stats.id,
                            "links": n,
                            "chunks": stats.chunks,
                            "sha256": hashlib.sha256(data).hexdigest(),
                        }
                    )
                )
                print(
                    f"  chain at {n} links ({stats.chunks} chunks a generation): "
                    f"{time.perf_counter() - started:.1f} s",
                    file=sys.stderr,
                )
    shutil.rmtree(repo_dir, ignore_errors=True)


# --- one measurement, in its own process ------------------------------------------------


def slowed(backend: Any, latency: float) -> Any:
    """`backend` with `latency` seconds added to every read and listing request."""
    if latency <= 0:
        return backend
    for method in ("get", "stat", "list", "list_sized", "read_into"):
        original = getattr(backend, method, None)
        if original is None:
            continue

        async def call(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            await asyncio.sleep(latency)
            return await _original(*args, **kwargs)

        setattr(backend, method, call)
    return backend


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which starts again at exec (ru_maxrss keeps the
    parent's peak across fork and exec on Linux, so every child would report the
    builder's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from dedupe import Repository
    from dedupe.backends import LocalBackend

    snap = Path(spec["snapshot"])
    scratch = Path(spec["scratch"])
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(snap / "repo", scratch / "repo")
    last = json.loads((snap / "last.json").read_text())
    backend = slowed(LocalBackend(scratch / "repo"), spec["latency"] / 1000)
    started = time.perf_counter()
    repo = await Repository.open(backend, PASSPHRASE, cache=False)
    opened = time.perf_counter()
    result: dict[str, Any] = {"open_s": opened - started}
    async with repo:
        if spec["op"] == "backup":
            stats = await repo.backup(snap / "source.db", name="db", kind="incremental")
            result["seconds"] = time.perf_counter() - opened
            if stats.kind != "incremental" or stats.parent != last["id"]:
                raise SystemExit(f"the backup was a {stats.kind} on {stats.parent}")
            result["new_bytes"] = stats.bytes_new
        else:
            target = scratch / "restored.db"
            await repo.restore("db@latest" if spec["op"] == "latest" else last["id"], target)
            result["seconds"] = time.perf_counter() - opened
            digest = hashlib.sha256(target.read_bytes()).hexdigest()
            if digest != last["sha256"]:
                raise SystemExit("the restore gave other bytes")
            result["new_bytes"] = 0
    result["peak_rss_mib"] = peak_rss_mib()
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def child(code: Path, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--measure", json.dumps({**spec, "code": str(code)})]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measuring {spec} with {code} failed:\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- the report ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", default="1,30,100,300", help="chain lengths (N incrementals)")
    parser.add_argument("--size", default="4MiB", help="the source's size (default 4MiB)")
    parser.add_argument("--pages", type=int, default=4, help="pages rewritten a day (default 4)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--code",
        action="append",
        type=Path,
        help="a dedupe tree to measure (repeatable; default: this one)",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="ms added to each request")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where chains are built (default: $TMPDIR/dedupe-bench-chain)",
    )
    parser.add_argument("--keep", action="store_true", help="reuse chains built before")
    parser.add_argument(
        "--latest", action="store_true", help="also restore by name (db@latest), not by id"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        spec = json.loads(args.measure)
        sys.path.insert(0, spec["code"])
        print(json.dumps(asyncio.run(measure(spec))))
        return

    links = sorted({int(n) for n in args.links.split(",")})
    size = parse_size(args.size)
    codes = [c.resolve() for c in (args.code or [REPO_ROOT])]
    base = args.workdir or Path(tempfile.gettempdir()) / "dedupe-bench-chain"
    work = base / f"s{size}-p{args.pages}-seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    missing = [n for n in links if not (work / str(n) / "last.json").exists()]
    if missing or not args.keep:
        print(f"building a chain of {max(links)} incrementals in {work}", file=sys.stderr)
        asyncio.run(build(work, links, size, args.pages, args.seed))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env.update(PYTHONSAFEPATH="1", DEDUPE_STATE_DIR=str(work / "state"))
    env.pop("PYTHONPATH", None)

    samples: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in range(args.runs):
        for n in links:
            for op in ("backup", "restore", "latest") if args.latest else ("backup", "restore"):
                for code in codes:
                    spec = {
                        "snapshot": str(work / str(n)),
                        "scratch": str(work / f"run-{os.getpid()}"),
                        "op": op,
                        "latency": args.latency,
                    }
                    got = child(code, spec, env)
                    samples.setdefault((str(code), n, op), []).append(got)
        print(f"  run {run + 1} of {args.runs} done", file=sys.stderr)

    rows = []
    for (code, n, op), got in samples.items():
        rows.append(
            {
                "code": code,
                "links": n,
                "op": op,
                "median_s": statistics.median(g["seconds"] for g in got),
                "min_s": min(g["seconds"] for g in got),
                "open_s": statistics.median(g["open_s"] for g in got),
                "peak_rss_mib": max(g["peak_rss_mib"] for g in got),
                "new_bytes": max(g["new_bytes"] for g in got),
            }
        )
    chunks = json.loads((work / str(links[-1]) / "last.json").read_text())["chunks"]
    if args.json:
        print(
            json.dumps(
                {
                    "size": size,
                    "pages": args.pages,
                    "chunks": chunks,
                    "runs": args.runs,
                    "latency_ms": args.latency,
                    "rows": rows,
                },
                indent=2,
            )
        )
        return
    print(
        f"source {size / (1 << 20):.1f} MiB ({chunks} chunks), {args.pages} pages a day, "
        f"latency {args.latency:g} ms; medians of {args.runs} runs (seconds)"
    )
    print(
        f"{'code':24} {'links':>5} {'op':8} {'median':>8} {'min':>8} {'open':>7} "
        f"{'peak RSS MiB':>12} {'new B':>6}"
    )
    for row in sorted(rows, key=lambda r: (r["op"], r["links"], codes.index(Path(r["code"])))):
        print(
            f"{Path(row['code']).name[:24]:24} {row['links']:5d} {row['op']:8} "
            f"{row['median_s']:8.3f} {row['min_s']:8.3f} {row['open_s']:7.3f} "
            f"{row['peak_rss_mib']:12.1f} {row['new_bytes']:6d}"
        )


if __name__ == "__main__":
    main()
