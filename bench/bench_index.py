#!/usr/bin/env python3
"""Chunk index: the native ChunkTable against a Python dict {bytes: tuple}.

    python3 bench/bench_index.py [--sizes 1M,5M] [--lookups 1000000] [--runs 3] [--json]

For each size N, one child process per implementation (so that each peak RSS is its
own) builds the index from one buffer of N random 48-byte index records (<32sIIII>, as
an index object's plaintext holds them):
  * native            ChunkTable().add_records(records, pack_map): grows as it loads
  * native reserved   ChunkTable(N).add_records(...): the count known up front
  * dict              {id: (pack_no, offset, stored, raw)} from struct.iter_unpack, which
                      is what decode_index + ChunkIndex.add do today (minus the
                      ChunkLocation objects)
and reports the load time, lookups per second (hits and misses, one call per id, and
batched: contains_many over 256 ids, the chunks of 4 MiB of data at 16 KiB, and over
65,536), bytes per entry (memory_bytes() for the table) and the peak RSS growth while
loading (ru_maxrss minus the RSS before the load; the records buffer is already there).
Each child is run --runs times (interleaved) and each figure is the median; lookup
figures inside a child are the best of three passes. Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dedupe.store._chunkindex import RECORD_BYTES, ChunkTable  # noqa: E402

ENTRY = struct.Struct("<32sIIII")
PACKS = 1000
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024
BATCHES = (256, 65_536)


def parse_count(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def make_records(n: int, seed: int) -> bytearray:
    """n records with random ids, built in blocks so that no large temporary raises the
    RSS high-water mark above the buffer itself."""
    rng = random.Random(seed)
    out = bytearray(RECORD_BYTES * n)
    block = 65_536
    for start in range(0, n, block):
        count = min(block, n - start)
        ids = rng.randbytes(32 * count)
        for j in range(count):
            i = start + j
            ENTRY.pack_into(
                out, RECORD_BYTES * i, ids[32 * j : 32 * j + 32], i % PACKS, i, 16_000, 16_384
            )
    return out


def rate(count: int, seconds: float) -> float:
    return count / seconds / 1e6 if seconds > 0 else float("inf")


def child(impl: str, n: int, lookups: int) -> dict[str, Any]:
    records = make_records(n, seed=1)
    rng = random.Random(2)
    sample = rng.sample(range(n), min(lookups, n))
    hits = [bytes(records[RECORD_BYTES * i : RECORD_BYTES * i + 32]) for i in sample]
    misses = [rng.randbytes(32) for _ in range(len(hits))]
    gc.collect()
    rss0 = rss_bytes()
    out: dict[str, Any] = {"impl": impl, "n": n}

    if impl == "dict":
        t0 = time.perf_counter()
        entries = list(ENTRY.iter_unpack(records))
        table: Any = {e[0]: e[1:] for e in entries}
        del entries
        out["load_s"] = time.perf_counter() - t0
        out["bytes_per_entry"] = None
    else:
        t0 = time.perf_counter()
        table = ChunkTable(n if impl == "native reserved" else 0)
        dups = table.add_records(records, list(range(PACKS)))
        out["load_s"] = time.perf_counter() - t0
        assert not dups and len(table) == n
        out["bytes_per_entry"] = table.memory_bytes() / n
    gc.collect()
    out["rss_delta_mib"] = (rss_bytes() - rss0) / (1 << 20)
    out["peak_rss_delta_mib"] = (peak_rss_bytes() - rss0) / (1 << 20)
    out["rss_per_entry"] = (rss_bytes() - rss0) / n

    for name, keys in (("get_hit", hits), ("get_miss", misses)):
        out[name] = best_rate(len(keys), per_call_get, table, keys)
    out["in_miss"] = best_rate(len(misses), per_call_in, table, misses)
    for batch in BATCHES:
        for name, keys in (("hit", hits), ("miss", misses)):
            joined = [b"".join(keys[i : i + batch]) for i in range(0, len(keys), batch)]
            fn = batched_dict if impl == "dict" else batched_native
            out[f"batch{batch}_{name}"] = best_rate(len(keys), fn, table, joined)
    return out


def per_call_get(table: Any, keys: list[bytes]) -> None:
    get = table.get
    for k in keys:
        get(k)


def per_call_in(table: Any, keys: list[bytes]) -> None:
    for k in keys:
        _ = k in table


def batched_native(table: ChunkTable, batches: list[bytes]) -> None:
    for buf in batches:
        table.contains_many(buf)


def batched_dict(table: dict[bytes, Any], batches: list[bytes]) -> None:
    # The dict's best batch form: a comprehension over the split ids.
    for buf in batches:
        _ = bytes([buf[i : i + 32] in table for i in range(0, len(buf), 32)])


def best_rate(count: int, fn: Any, *args: Any, passes: int = 3) -> float:
    """Millions of lookups per second, the best of `passes` calls of fn(*args)."""
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return rate(count, best)


def run_child(impl: str, n: int, lookups: int) -> dict[str, Any]:
    argv = [sys.executable, os.path.abspath(__file__), "--child", impl, str(n), str(lookups)]
    res = subprocess.run(argv, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(res.stdout)
    return result


def median_row(results: list[dict[str, Any]]) -> dict[str, Any]:
    row = dict(results[0])
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in results)
    return row


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,5M")
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        impl, n, lookups = args.child
        print(json.dumps(child(impl, int(n), int(lookups))))
        return

    rows = []
    for n in (parse_count(s) for s in args.sizes.split(",")):
        impls = ("native", "native reserved", "dict")
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for _ in range(args.runs):
            for impl in impls:
                runs[impl].append(run_child(impl, n, args.lookups))
        for impl in impls:
            rows.append(median_row(runs[impl]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        "| N | impl | load s | load M/s | B/entry (memory_bytes) | RSS B/entry | "
        "peak RSS delta MiB | get hit M/s | get miss M/s | in miss M/s | "
        "batch 256 hit/miss M/s | batch 64Ki hit/miss M/s |"
    )
    print("|---|---|" + "---:|" * 10)
    for r in rows:
        print(
            f"| {r['n'] / 1e6:g}M | {r['impl']} | {r['load_s']:.2f} | "
            f"{rate(r['n'], r['load_s']):.2f} | {fmt(r['bytes_per_entry'], '.1f')} | "
            f"{r['rss_per_entry']:.1f} | {r['peak_rss_delta_mib']:.0f} | "
            f"{r['get_hit']:.2f} | {r['get_miss']:.2f} | {r['in_miss']:.2f} | "
            f"{r['batch256_hit']:.1f}/{r['batch256_miss']:.1f} | "
            f"{r['batch65536_hit']:.1f}/{r['batch65536_miss']:.1f} |"
        )


if __name__ == "__main__":
    main()
