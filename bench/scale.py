#!/usr/bin/env python3
"""Scale test: does backup time grow linearly with the snapshot, memory not at all, and
what does a large index cost to open and to back up against?

    python3 bench/scale.py                 # 1 GiB vs 4 GiB, 5 million index entries
    python3 bench/scale.py --small         # 256 MiB vs 1 GiB (a few minutes)
    python3 bench/scale.py --entries 1000000 --workdir /big/disk/scale --json

1. Snapshot size: back up S and 4*S bytes of generated database-like data (the generator
   of `dedupe bench`) into fresh repositories, each backup its own `python -m dedupe`
   process, and print the ratio of wall times (4.0 is linear) and of peak RSS. A fresh
   repository's index grows with what is stored (~54 B per chunk, allowed), so this
   ratio mixes snapshot size and repository size.
2. Snapshot size alone: one repository holding the chunks of both snapshots (each backed
   up once), then `--runs` full and incremental backups of each, alternating: the index
   is the same for all of them and nothing new is stored, so any growth of the peak RSS
   from S to 4*S is what a backup holds per chunk of its snapshot (DESIGN.md: none).
3. Repository size: a repository holding N synthetic index entries (default 5 million),
   written as real, sealed index objects through RepositoryStore.write_index with
   random chunk ids in empty pack files. They are *synthetic*: no pack holds their data,
   so `verify --read-data` would fail there; only the open and lookup paths are
   measured: Repository.open (time, peak RSS), 100,000 lookups (half present, half
   absent), and a small backup's peak RSS on top of the index, against the same backup
   in an empty repository. The difference divided by N is the memory cost of one index
   entry (DESIGN.md: at most 64 bytes once the index is native).

Nothing is asserted: the script reports. Each measured command is reaped with os.wait4
through dedupe.bench.measure_command, so its peak RSS is its own. The machine may be
shared: the figures are single runs, so repeat the script before trusting a ratio.
Repositories use the weakest Argon2id (KdfParams.weakest()), as `dedupe bench` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dedupe
from dedupe import Repository
from dedupe.bench import Measured, generate_data, measure_command, parse_size
from dedupe.crypto import KdfParams
from dedupe.format.index import IndexEntry, PackRecord, encode_entry_records
from dedupe.store.index import ChunkIndex
from dedupe.store.repository import pack_name

MiB = 1 << 20
PASSPHRASE = "dedupe-scale-throwaway"
ENTRIES_PER_OBJECT = 100_000
ENTRIES_PER_PACK = 1_000  # ~16 MiB packs of ~16 KiB chunks
LOOKUPS = 100_000
SMALL_BACKUP = 64 * MiB

# Runs in a child: opens the repository, looks up ids, prints one JSON line.
OPEN_PROBE = """\
import asyncio, json, os, sys, time
from dedupe import Repository

async def main():
    t0 = time.perf_counter()
    repo = await Repository.open(sys.argv[1], os.environ["DEDUPE_PASSWORD"])
    opened = time.perf_counter() - t0
    index = repo._store.index  # the lookup path of the backup's dedupe stage
    with open(sys.argv[2]) as f:
        present = [bytes.fromhex(h) for h in json.load(f)]
    absent = [os.urandom(32) for _ in present]
    t0 = time.perf_counter()
    hits = sum(index.usable(c) for c in present) + sum(index.usable(c) for c in absent)
    looked = time.perf_counter() - t0
    entries = len(index)
    await repo.close()
    print(json.dumps({"open_s": opened, "lookup_s": looked, "lookups": 2 * len(present),
                      "hits": hits, "entries": entries}))

asyncio.run(main())
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def child_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    root = str(Path(dedupe.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    env["DEDUPE_PASSWORD"] = PASSPHRASE
    env["HOME"] = str(workdir)
    return env


# Every measured backup's --chunker: "auto" finds no SQLite header in the generated data
# and takes FastCDC (~16 KiB chunks); "fixed:4096" cuts it as the page path cuts a
# database file, four times as many chunks per GiB (set from --chunker).
CHUNKER = "auto"


async def new_repo(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    repo = await Repository.init(path, PASSPHRASE, kdf=KdfParams.weakest())
    await repo.close()


async def measured_backup(
    repo: Path,
    source: Path,
    env: dict[str, str],
    scratch: Path,
    *,
    name: str = "scale",
    kind: str = "incremental",
) -> Measured:
    os.sync()
    with open(source, "rb", buffering=0) as f:  # warm the page cache, as dedupe bench does
        while f.read(4 * MiB):
            pass
    argv = [sys.executable, "-m", "dedupe", "backup", str(source), "--name", name, "--json"]
    argv += ["--type", kind, "--chunker", CHUNKER]
    m = await measure_command(
        argv, env={**env, "DEDUPE_REPO": str(repo)}, cwd=scratch, scratch=scratch
    )
    if m.rc != 0:
        raise SystemExit(f"backup failed: {m.failure()}")
    return m


def data_file(workdir: Path, size: int) -> Path:
    path = workdir / f"data-{size}.db"
    if not path.exists() or path.stat().st_size != size:
        log(f"generating {size / MiB:.0f} MiB of data ...")
        generate_data(path, size)
    return path


async def snapshot_scaling(
    workdir: Path, small: int, env: dict[str, str], scratch: Path
) -> dict[str, Any]:
    rows = []
    for size in (small, 4 * small):
        source = data_file(workdir, size)
        repo = workdir / "repo-size"
        await new_repo(repo)
        log(f"backup of {size / MiB:.0f} MiB ...")
        m = await measured_backup(repo, source, env, scratch)
        own = json.loads(m.stdout)["seconds"]
        rows.append(
            {
                "bytes": size,
                "wall_s": m.wall_s,
                "engine_s": own,
                "cpu_s": m.user_s + m.sys_s,
                "mb_s": size / m.wall_s / 1e6,
                "maxrss_bytes": m.maxrss_bytes,
            }
        )
        shutil.rmtree(repo)
    a, b = rows
    return {
        "runs": rows,
        "time_ratio": b["wall_s"] / a["wall_s"],
        "engine_time_ratio": b["engine_s"] / a["engine_s"],
        "rss_ratio": b["maxrss_bytes"] / a["maxrss_bytes"],
        "size_ratio": b["bytes"] / a["bytes"],
    }


async def same_repository_scaling(
    workdir: Path, small: int, env: dict[str, str], scratch: Path, runs: int
) -> dict[str, Any]:
    sources = [data_file(workdir, size) for size in (small, 4 * small)]
    repo = workdir / "repo-both"
    await new_repo(repo)
    for source in sources:
        log(f"storing the chunks of {source.name} ...")
        await measured_backup(repo, source, env, scratch, name=source.name, kind="full")
    peaks: dict[str, dict[int, list[int]]] = {"full": {}, "incremental": {}}
    for run in range(runs):
        for kind in ("full", "incremental"):
            for size, source in zip((small, 4 * small), sources, strict=True):
                log(f"run {run + 1}/{runs}: {kind} of {size / MiB:.0f} MiB, nothing new ...")
                m = await measured_backup(repo, source, env, scratch, name=source.name, kind=kind)
                peaks[kind].setdefault(size, []).append(m.maxrss_bytes)
    shutil.rmtree(repo)
    result: dict[str, Any] = {"runs": runs}
    for kind, by_size in peaks.items():
        a, b = (statistics.median(by_size[size]) for size in (small, 4 * small))
        result[kind] = {
            "maxrss_bytes": {str(size): v for size, v in by_size.items()},
            "median_small": a,
            "median_large": b,
            "rss_ratio": b / a,
            "growth_bytes": b - a,
        }
    return result


async def build_index(repo: Path, entries: int) -> tuple[float, list[str]]:
    """Write `entries` synthetic entries in index objects of ENTRIES_PER_OBJECT; returns
    (seconds, a sample of the chunk ids for lookups)."""
    t0 = time.perf_counter()
    r = await Repository.open(repo, PASSPHRASE)
    store = r._store  # the storage layer: the only way to write index objects directly
    sample: list[str] = []
    per_object = -(-(LOOKUPS // 2) // -(-entries // ENTRIES_PER_OBJECT))  # ids kept per object
    done = 0
    try:
        while done < entries:
            n = min(ENTRIES_PER_OBJECT, entries - done)
            n_packs = -(-n // ENTRIES_PER_PACK)
            packs = [PackRecord(os.urandom(32), 16 * MiB) for _ in range(n_packs)]
            keys = [store.keymaps.pack_entry(p.pack_id, os.urandom(32)) for p in packs]
            for p in packs:  # empty files: the packs are "present", their content is not
                path = repo.joinpath(*pack_name(p.pack_id).split("/"))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            ids = os.urandom(32 * n)
            batch = [
                IndexEntry(
                    ids[32 * i : 32 * i + 32],
                    i // ENTRIES_PER_PACK,
                    (i % ENTRIES_PER_PACK) * 16424,
                    16424,
                    16384,
                )
                for i in range(n)
            ]
            await store.write_index(packs, encode_entry_records(batch), keys)
            store.index = ChunkIndex()  # the builder need not hold what it wrote
            sample += [e.chunk_id.hex() for e in batch[:per_object]]
            done += n
            if done % (10 * ENTRIES_PER_OBJECT) == 0 or done == entries:
                log(f"  {done:,} / {entries:,} entries written")
    finally:
        await r.close()
    return time.perf_counter() - t0, sample[: LOOKUPS // 2]


async def index_scaling(
    workdir: Path, entries: int, env: dict[str, str], scratch: Path
) -> dict[str, Any]:
    source = data_file(workdir, SMALL_BACKUP)
    empty, big = workdir / "repo-empty", workdir / "repo-index"
    await new_repo(empty)
    await new_repo(big)
    log(f"writing {entries:,} synthetic index entries ...")
    build_s, sample = await build_index(big, entries)
    result: dict[str, Any] = {"entries": entries, "build_s": build_s}
    for label, repo, ids in (("empty", empty, []), ("index", big, sample)):
        id_file = scratch / "ids.json"
        id_file.write_text(json.dumps(ids))
        os.sync()
        m = await measure_command(
            [sys.executable, "-c", OPEN_PROBE, str(repo), str(id_file)],
            env=env,
            cwd=scratch,
            scratch=scratch,
        )
        if m.rc != 0:
            raise SystemExit(f"open probe failed: {m.failure()}")
        probe = json.loads(m.stdout)
        log(f"open of the {label} repository: {probe['open_s']:.2f} s")
        b = await measured_backup(repo, source, env, scratch)
        result[label] = {
            **probe,
            "open_wall_s": m.wall_s,
            "open_maxrss_bytes": m.maxrss_bytes,
            "backup_wall_s": b.wall_s,
            "backup_maxrss_bytes": b.maxrss_bytes,
        }
    e, i = result["empty"], result["index"]
    result["bytes_per_entry_open"] = (i["open_maxrss_bytes"] - e["open_maxrss_bytes"]) / entries
    result["bytes_per_entry_backup"] = (
        i["backup_maxrss_bytes"] - e["backup_maxrss_bytes"]
    ) / entries
    shutil.rmtree(empty)
    shutil.rmtree(big)
    return result


def render(r: dict[str, Any]) -> str:
    mib = 1 / MiB
    s = r["snapshot"]
    out = [
        f"dedupe {r['dedupe']} scale test, {r['cpus']} CPUs, --chunker {r.get('chunker', 'auto')}"
        " (single runs; shared machine?)",
        "",
    ]
    out.append("Snapshot size (one backup each, fresh repository):")
    out.append(f"  {'size':>9}  {'wall s':>7}  {'engine s':>8}  {'MB/s':>6}  {'peak RSS MiB':>12}")
    for row in s["runs"]:
        out.append(
            f"  {row['bytes'] * mib:>5.0f} MiB  {row['wall_s']:>7.2f}  {row['engine_s']:>8.2f}"
            f"  {row['mb_s']:>6.1f}  {row['maxrss_bytes'] * mib:>12.0f}"
        )
    # The engine's own time: wall time adds a constant (start-up, open) that hides growth.
    linear = 0.8 * s["size_ratio"] <= s["engine_time_ratio"] <= 1.25 * s["size_ratio"]
    flat = s["rss_ratio"] <= 1.15
    out.append(
        f"  engine time x{s['engine_time_ratio']:.2f} (wall x{s['time_ratio']:.2f}, with "
        f"start-up) for x{s['size_ratio']:.0f} the data: "
        f"{'linear' if linear else 'NOT linear'} (0.8..1.25 of x{s['size_ratio']:.0f})"
    )
    out.append(
        f"  peak RSS x{s['rss_ratio']:.2f}: "
        + ("flat (within 15%)" if flat else "GROWS with the snapshot")
    )
    same = r.get("same_repository")
    if same:
        out += [
            "",
            f"Snapshot size alone (one repository holding both; nothing new stored; "
            f"median of {same['runs']} runs):",
            f"  {'backup':>11}  {'small MiB':>9}  {'4x MiB':>7}  {'growth MiB':>10}  ratio",
        ]
        for kind in ("full", "incremental"):
            v = same[kind]
            out.append(
                f"  {kind:>11}  {v['median_small'] * mib:>9.1f}  {v['median_large'] * mib:>7.1f}"
                f"  {v['growth_bytes'] * mib:>10.1f}  x{v['rss_ratio']:.3f}"
            )
    x = r.get("index")
    if x:
        out.append("")
        out.append(
            f"Repository with {x['entries']:,} synthetic index entries "
            f"(written in {x['build_s']:.0f} s):"
        )
        out.append(
            f"  {'repository':>10}  {'open s':>6}  {'open RSS MiB':>12}  {'lookups/s':>10}"
            f"  {'64 MiB backup s':>15}  {'backup RSS MiB':>14}"
        )
        for label in ("empty", "index"):
            v = x[label]
            rate = v["lookups"] / v["lookup_s"] if v["lookup_s"] and v["lookups"] else 0
            out.append(
                f"  {label:>10}  {v['open_s']:>6.2f}  {v['open_maxrss_bytes'] * mib:>12.0f}"
                f"  {rate:>10,.0f}  {v['backup_wall_s']:>15.2f}"
                f"  {v['backup_maxrss_bytes'] * mib:>14.0f}"
            )
        out.append(
            f"  memory per index entry: {x['bytes_per_entry_open']:.0f} B at open, "
            f"{x['bytes_per_entry_backup']:.0f} B in a backup (DESIGN.md target: <= 64 B)"
        )
        out.append(
            f"  lookups found {x['index']['hits']:,} of {x['index']['lookups'] // 2:,} present ids"
        )
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="dedupe-scale-") if own else args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    env = child_env(workdir)
    try:
        small = parse_size(args.size) if args.size else (256 * MiB if args.small else 1 << 30)
        report: dict[str, Any] = {
            "dedupe": dedupe.__version__,
            "cpus": os.cpu_count(),
            "chunker": CHUNKER,
            "snapshot": await snapshot_scaling(workdir, small, env, scratch),
        }
        if args.runs > 0:
            report["same_repository"] = await same_repository_scaling(
                workdir, small, env, scratch, args.runs
            )
        if args.entries > 0:
            report["index"] = await index_scaling(workdir, args.entries, env, scratch)
        return report
    finally:
        if own and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="256 MiB vs 1 GiB instead of 1 vs 4 GiB")
    p.add_argument("--size", help="the smaller snapshot (the larger is 4x), e.g. 512MiB")
    p.add_argument(
        "--entries", type=int, default=5_000_000, help="synthetic index entries (0: skip)"
    )
    p.add_argument("--runs", type=int, default=3, help="runs of the same-repository test (0: skip)")
    p.add_argument(
        "--chunker",
        default="auto",
        help="the backups' --chunker: auto (FastCDC on this data) or fixed:4096 (as the page"
        " path cuts a database)",
    )
    p.add_argument("--workdir", type=Path, help="where data and repositories go [a tmp dir]")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--json", action="store_true", help="print JSON on stdout, the table on stderr")
    args = p.parse_args()
    global CHUNKER
    CHUNKER = args.chunker
    report = asyncio.run(main_async(args))
    if args.json:
        log(render(report))
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
