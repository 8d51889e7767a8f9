#!/usr/bin/env python3
"""Would a trained zstd dictionary pay (issue 17, "compression that pays")? On a file pair
(day 1, day 2), cut with dedupe's own chunker as a backup would cut them: a dictionary is
trained on a sample of day 1's chunks (as a repository could, from its first backup of a
name), then day 1's chunks and day 2's new chunks are compressed one by one, as blobs are,
with and without it, and at other levels. Reports stored bytes and compression time per
variant (median of --runs, all variants in one run, alternating), relative to zstd-1
without a dictionary, which is what dedupe does today.

    .venv/bin/python bench/bench_zstd_dict.py day1.db day2.db             # auto: 4 KiB pages
    .venv/bin/python bench/bench_zstd_dict.py d1.dump d2.dump --chunker fastcdc

Adopt (the issue's rule) if a dictionary saves more than 5% of the stored bytes for under
10% more compression time.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dedupe.chunking import DEFAULT_PARAMS, make_chunker  # noqa: E402
from dedupe.chunking.gear import gear_table  # noqa: E402
from dedupe.chunking.strategy import SNIFF_BYTES, parse_spec, sniff  # noqa: E402


def cut(path: Path, chunker: str, gear: bytes) -> list[bytes]:
    data = path.read_bytes()
    spec = parse_spec(chunker, DEFAULT_PARAMS)
    if spec == "auto":
        spec = sniff(data[:SNIFF_BYTES], DEFAULT_PARAMS)
    c = make_chunker(spec, DEFAULT_PARAMS, gear)
    out = [bytes(x) for x in c.feed(data)]
    return out + [bytes(x) for x in c.finish()]


def stored(compress: zstandard.ZstdCompressor, chunks: list[bytes]) -> tuple[int, float]:
    """Bytes of the blobs' plaintexts (compression byte + zstd frame, or the chunk as is
    when that is smaller, as dedupe frames them) and seconds spent."""
    fn = compress.compress
    t = time.perf_counter()
    total = 0
    for c in chunks:
        z = len(fn(c))
        total += 1 + (z if z < len(c) else len(c))
    return total, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("day1", type=Path)
    ap.add_argument("day2", type=Path)
    ap.add_argument("--chunker", default="auto", help="auto, fastcdc, tar or fixed:SIZE")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sample", type=int, default=8 << 20, help="bytes of day 1 to train on")
    args = ap.parse_args()

    gear = gear_table(os.urandom(32))
    day1 = cut(args.day1, args.chunker, gear)
    seen = set(map(hash, day1))
    day2_new = [c for c in cut(args.day2, args.chunker, gear) if hash(c) not in seen]
    rng = random.Random(1)
    sample = rng.sample(day1, min(len(day1), max(1, args.sample // 4096)))
    variants: dict[str, zstandard.ZstdCompressor] = {
        "zstd-1 (today)": zstandard.ZstdCompressor(level=1, write_content_size=False),
        "zstd-3": zstandard.ZstdCompressor(level=3, write_content_size=False),
    }
    for size in (16 << 10, 64 << 10, 110 << 10):
        t = time.perf_counter()
        d = zstandard.train_dictionary(size, sample, level=1)
        took = time.perf_counter() - t
        variants[f"zstd-1 + {size >> 10} KiB dict (trained in {took:.1f} s)"] = (
            zstandard.ZstdCompressor(
                level=1, dict_data=d, write_content_size=False, write_dict_id=False
            )
        )
    results: dict[str, list[tuple[int, float, int, float]]] = {k: [] for k in variants}
    names = list(variants)
    for run in range(args.runs):
        for name in names if run % 2 == 0 else names[::-1]:
            b1, t1 = stored(variants[name], day1)
            b2, t2 = stored(variants[name], day2_new)
            results[name].append((b1, t1, b2, t2))
    raw1, raw2 = sum(map(len, day1)), sum(map(len, day2_new))
    print(
        f"{args.chunker}: day 1 {len(day1)} chunks, {raw1 / 1e6:.1f} MB; day 2 new"
        f" {len(day2_new)} chunks, {raw2 / 1e6:.1f} MB; {args.runs} runs, medians"
    )
    base = results[names[0]]
    b1_0, t1_0 = base[0][0], statistics.median(r[1] for r in base)
    b2_0 = base[0][2]
    print(f"{'variant':44} {'day 1 MB':>9} {'vs today':>9} {'day 2 MB':>9} {'vs today':>9}"
          f" {'time vs today':>14}")  # fmt: skip
    for name in names:
        r = results[name]
        b1, b2 = r[0][0], r[0][2]
        t1 = statistics.median(x[1] for x in r)
        print(
            f"{name:44} {b1 / 1e6:9.1f} {b1 / b1_0:8.3f}x {b2 / 1e6:9.1f} {b2 / b2_0:8.3f}x"
            f" {t1 / t1_0:13.3f}x"
        )


if __name__ == "__main__":
    main()
