#!/usr/bin/env python3
"""Chunker throughput: dedupe's native FastCDC vs pyfastcdc, and the dedupe study.

    python3 bench/bench_chunker.py [--size 256MiB] [--runs 5] [--input FILE] [--json]
    python3 bench/bench_chunker.py --study DAY1 DAY2 [--study DAY1 DAY2 ...] [--json]

The first form chunks the same in-memory data with the same parameters (DEFAULT_PARAMS
unless --avg/--min/--max/--normalization are given) through:
  * dedupe one-shot     Chunker.chunk_all(data)
  * dedupe streaming    Chunker.feed() with 4 MiB feeds (bytes, and memoryviews that
                        the chunker must copy), then finish()
  * pyfastcdc           FastCDC(...).cut_buf(data) (its Cython build), same min/avg/max/NC
runs them interleaved --runs times and prints the median MB/s of each (wall clock, and
per CPU second of the measuring thread, which shared machines disturb less) and the
ratio. It then chunks two buffers in two threads at once (aggregate MB/s, and CPU seconds
per wall second: above 1 only if both threads run at once) against one thread doing
both, to show that the kernel releases the GIL. Without --input the data is
deterministic: 1 MiB blocks alternating BLAKE3-XOF random bytes and generated text.

The second form (--study) is the measurement behind DEFAULT_PARAMS (docs/CHUNKING.md):
for each parameter set, the chunks of day 2 whose content is not among day 1's chunks.
Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import blake3  # noqa: E402

from dedupe.chunking import DEFAULT_PARAMS, Chunker, ChunkerParams, gear_table  # noqa: E402

MiB = 1 << 20
FEED = 4 * MiB
BENCH_KEY = bytes(range(32))  # any fixed key: speed does not depend on it


def parse_size(s: str) -> int:
    low = s.strip().lower().rstrip("b").rstrip("i")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if low and low[-1] in units:
        return int(float(low[:-1]) * units[low[-1]])
    return int(low)


def synthetic(size: int, seed: int = 1) -> bytes:
    """Deterministic mix of incompressible and text-like bytes."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("etaoinshrdlucmfwypvbgkjqxz", k=rng.randint(1, 10)))
        for _ in range(5000)
    ]
    xof = blake3.blake3(seed.to_bytes(8, "little")).digest(length=size)
    out = bytearray()
    block = 0
    while len(out) < size:
        if block % 2 == 0:
            out += xof[len(out) : len(out) + MiB]
        else:
            text = " ".join(rng.choices(words, k=MiB // 5)).encode()
            out += text[:MiB]
        block += 1
    return bytes(out[:size])


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def run_oneshot(ch: Chunker, data: bytes) -> int:
    return len(ch.chunk_all(data))


def run_stream(ch: Chunker, feeds: list[bytes] | list[memoryview]) -> int:
    n = 0
    for block in feeds:
        n += len(ch.feed(block))
    return n + len(ch.finish())


def run_pyfastcdc(cdc: Any, data: bytes) -> int:
    return sum(1 for _ in cdc.cut_buf(data))


def bench(args: argparse.Namespace) -> dict[str, Any]:
    params = ChunkerParams(args.min, args.avg, args.max, args.normalization)
    if args.input:
        with open(args.input, "rb") as f:
            data = f.read(args.size) if args.size else f.read()
        source = f"file {args.input}"
    else:
        data = synthetic(args.size)
        source = "synthetic (1 MiB blocks: BLAKE3-XOF random / generated text)"
    ch = Chunker(params, gear_table(BENCH_KEY))
    # bytes feeds (what a reader's read() returns) are chunked in place; other buffers are
    # copied once, since the chunks must not change under the caller's feet.
    byte_feeds = [data[off : off + FEED] for off in range(0, len(data), FEED)]
    view_feeds = [memoryview(data)[off : off + FEED] for off in range(0, len(data), FEED)]
    impls: dict[str, Any] = {
        "dedupe one-shot": lambda: run_oneshot(ch, data),
        "dedupe stream, 4 MiB bytes feeds": lambda: run_stream(ch, byte_feeds),
        "dedupe stream, 4 MiB memoryview feeds": lambda: run_stream(ch, view_feeds),
    }
    try:
        import pyfastcdc
        from pyfastcdc.cy import FastCDC  # the Cython build, never its pure-Python one

        cdc = FastCDC(
            params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=params.normalization,
        )
        impls[f"pyfastcdc {pyfastcdc.__version__} (cy)"] = lambda: run_pyfastcdc(cdc, data)
    except ImportError:
        print("pyfastcdc not installed: skipping it", file=sys.stderr)

    speeds: dict[str, list[float]] = {name: [] for name in impls}
    chunks: dict[str, int] = {}
    cpu_speeds: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.runs):  # interleaved, so drifting machine load hits all alike
        for name, fn in impls.items():
            c, t = time.thread_time(), time.perf_counter()
            chunks[name] = fn()
            speeds[name].append(mbps(len(data), time.perf_counter() - t))
            cpu_speeds[name].append(mbps(len(data), time.thread_time() - c))

    # GIL: two threads, each chunking its own half, vs one thread doing both halves.
    half = len(data) // 2
    parts = [data[:half], data[half : 2 * half]]
    chs = [Chunker(params, gear_table(BENCH_KEY)) for _ in parts]
    one: list[float] = []
    two: list[float] = []
    par: list[float] = []  # CPU seconds per wall second while two threads run
    for _ in range(args.runs):
        t = time.perf_counter()
        for ch1, part in zip(chs, parts, strict=True):
            ch1.chunk_all(part)
        one.append(mbps(2 * half, time.perf_counter() - t))
        threads = [
            threading.Thread(target=ch1.chunk_all, args=(part,))
            for ch1, part in zip(chs, parts, strict=True)
        ]
        cpu, t = time.process_time(), time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        two.append(mbps(2 * half, wall))
        par.append((time.process_time() - cpu) / wall)

    # GIL probe that needs no idle core: count how far a pure-Python loop in this thread
    # gets while a worker thread is inside one long chunk_all() call. Were the GIL held
    # for the call, the loop could not run until the call returned.
    ticks_during = []
    for _ in range(3):
        worker = threading.Thread(target=chs[0].chunk_all, args=(data,))
        ticks = 0
        t = time.perf_counter()
        worker.start()
        while worker.is_alive():
            ticks += 1
        ticks_during.append((ticks, time.perf_counter() - t))
    gil_ticks, gil_secs = max(ticks_during)

    med = {name: statistics.median(v) for name, v in speeds.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu_speeds.items()}
    best = {name: max(v) for name, v in speeds.items()}
    result: dict[str, Any] = {
        "source": source,
        "bytes": len(data),
        "runs": args.runs,
        "params": params.to_dict(),
        "cpus": os.cpu_count(),
        "median_mb_s": med,
        "median_cpu_mb_s": med_cpu,
        "best_mb_s": best,
        "chunks": chunks,
        "threads": {
            "1 thread MB/s": statistics.median(one),
            "2 threads MB/s": statistics.median(two),
            "2 threads CPU s per wall s": statistics.median(par),
            "python loop iterations during one chunk_all in another thread": gil_ticks,
            "seconds of that chunk_all": gil_secs,
        },
    }
    ref = next((n for n in med if n.startswith("pyfastcdc")), None)
    if ref:
        result["ratio_vs_pyfastcdc"] = {n: med[n] / med[ref] for n in med if n != ref}
        result["best_ratio_vs_pyfastcdc"] = {n: best[n] / best[ref] for n in best if n != ref}
        result["cpu_ratio_vs_pyfastcdc"] = {
            n: med_cpu[n] / med_cpu[ref] for n in med_cpu if n != ref
        }
    return result


def chunk_digests(ch: Chunker, data: bytes) -> list[tuple[bytes, int]]:
    return [(blake3.blake3(c).digest(), len(c)) for c in ch.chunk_all(data)]


STUDY_PARAMS = [
    ChunkerParams(1024, 4096, 16384),
    ChunkerParams(2048, 8192, 32768),
    ChunkerParams(4096, 16384, 65536),
    ChunkerParams(8192, 32768, 131072),
    ChunkerParams(16384, 65536, 262144),
    ChunkerParams(2048, 16384, 65536),
    ChunkerParams(8192, 16384, 65536),
    ChunkerParams(4096, 16384, 262144),
    ChunkerParams(4096, 16384, 65536, 1),
    ChunkerParams(4096, 16384, 65536, 3),
]


def study(pairs: list[list[str]], runs: int) -> list[dict[str, Any]]:
    rows = []
    gear = gear_table(BENCH_KEY)
    for day1_path, day2_path in pairs:
        with open(day1_path, "rb") as f:
            day1 = f.read()
        with open(day2_path, "rb") as f:
            day2 = f.read()
        for p in STUDY_PARAMS:
            ch = Chunker(p, gear)
            known = {d for d, _ in chunk_digests(ch, day1)}
            seen: set[bytes] = set()
            new_bytes = 0
            d2 = chunk_digests(ch, day2)
            for d, n in d2:
                if d not in known and d not in seen:
                    new_bytes += n
                seen.add(d)
            speeds = []
            for _ in range(runs):
                t = time.perf_counter()
                ch.chunk_all(day2)
                speeds.append(mbps(len(day2), time.perf_counter() - t))
            rows.append(
                {
                    "input": os.path.basename(day2_path),
                    "params": p.to_dict(),
                    "day2_bytes": len(day2),
                    "day2_chunks": len(d2),
                    "mean_chunk": len(day2) / max(1, len(d2)),
                    "chunks_per_gib": len(d2) * (1 << 30) / len(day2),
                    "new_bytes": new_bytes,
                    "new_pct": 100.0 * new_bytes / len(day2),
                    "mb_s": statistics.median(speeds),
                }
            )
            print(fmt_study_row(rows[-1]), file=sys.stderr, flush=True)
        # Reference: fixed 4 KiB blocks (the page-aligned strategy) on the same pair.
        blocks1 = {blake3.blake3(day1[i : i + 4096]).digest() for i in range(0, len(day1), 4096)}
        new_fixed = sum(
            len(day2[i : i + 4096])
            for i in range(0, len(day2), 4096)
            if blake3.blake3(day2[i : i + 4096]).digest() not in blocks1
        )
        rows.append(
            {
                "input": os.path.basename(day2_path),
                "params": {"fixed": 4096},
                "day2_bytes": len(day2),
                "day2_chunks": -(-len(day2) // 4096),
                "mean_chunk": 4096.0,
                "chunks_per_gib": (1 << 30) / 4096,
                "new_bytes": new_fixed,
                "new_pct": 100.0 * new_fixed / len(day2),
                "mb_s": float("nan"),
            }
        )
        print(fmt_study_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def fmt_params(p: dict[str, Any]) -> str:
    if "fixed" in p:
        return f"fixed {p['fixed'] // 1024} KiB blocks"
    k = 1024
    return (
        f"{p['min_size'] // k}/{p['avg_size'] // k}/{p['max_size'] // k} KiB nc{p['normalization']}"
    )


def fmt_study_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['input']} | {fmt_params(r['params'])} | {r['day2_chunks']} | "
        f"{r['mean_chunk'] / 1024:.1f} KiB | {r['chunks_per_gib']:.0f} | "
        f"{r['new_bytes'] / MiB:.1f} MiB | {r['new_pct']:.1f}% | {r['mb_s']:.0f} |"
    )


def print_bench(r: dict[str, Any]) -> None:
    print(
        f"data: {r['source']}, {r['bytes'] / MiB:.0f} MiB; params {r['params']}; "
        f"median of {r['runs']} interleaved runs; {r['cpus']} CPUs"
    )
    print(
        "| implementation | median MB/s | best MB/s | median CPU-time MB/s | chunks "
        "| vs pyfastcdc (median / best / CPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, v in r["median_mb_s"].items():
        ratio = r.get("ratio_vs_pyfastcdc", {}).get(name, 1.0)
        bratio = r.get("best_ratio_vs_pyfastcdc", {}).get(name, 1.0)
        cratio = r.get("cpu_ratio_vs_pyfastcdc", {}).get(name, 1.0)
        print(
            f"| {name} | {v:.0f} | {r['best_mb_s'][name]:.0f} "
            f"| {r['median_cpu_mb_s'][name]:.0f} | {r['chunks'][name]} "
            f"| {ratio:.2f}x / {bratio:.2f}x / {cratio:.2f}x |"
        )
    t = r["threads"]
    print()
    print("| GIL | value |")
    print("|---|---:|")
    print(f"| 1 thread chunking both halves, MB/s (median) | {t['1 thread MB/s']:.0f} |")
    print(f"| 2 threads, one half each, aggregate MB/s (median) | {t['2 threads MB/s']:.0f} |")
    print(f"| 2 threads: CPU seconds per wall second | {t['2 threads CPU s per wall s']:.2f} |")
    key = "python loop iterations during one chunk_all in another thread"
    print(
        f"| Python loop iterations run during one {t['seconds of that chunk_all']:.2f} s "
        f"chunk_all in another thread | {t[key]:,} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="bytes of data (default 256MiB; with --input: the whole file)",
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--input", help="chunk this file (e.g. a gen_snapshot.py SQLite file)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--min", type=parse_size, default=DEFAULT_PARAMS.min_size)
    ap.add_argument("--avg", type=parse_size, default=DEFAULT_PARAMS.avg_size)
    ap.add_argument("--max", type=parse_size, default=DEFAULT_PARAMS.max_size)
    ap.add_argument("--normalization", type=int, default=DEFAULT_PARAMS.normalization)
    ap.add_argument(
        "--study",
        nargs=2,
        action="append",
        metavar=("DAY1", "DAY2"),
        help="dedupe study over a day1/day2 pair (repeatable)",
    )
    args = ap.parse_args()
    if args.study:
        rows = study(args.study, max(1, min(args.runs, 3)))
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(
                "| input | min/avg/max, NC | day-2 chunks | mean chunk | chunks/GiB "
                "| new bytes | new % of day 2 | chunker MB/s |"
            )
            print("|---|---|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                print(fmt_study_row(r))
        return
    if args.size is None and not args.input:
        args.size = 256 * MiB
    r = bench(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_bench(r)


if __name__ == "__main__":
    main()
