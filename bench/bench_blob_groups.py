#!/usr/bin/env python3
"""What would blobs of several pages buy (issue 17)? A prototype measurement, before any
format change: day 1's chunks, cut as a backup cuts them (`auto`: a SQLite file in its
pages), are framed, sealed into packs and opened again with dedupe's own native kernels
(BlobCodec.frame, PackWriter, BlobCodec.open_joined), once one blob per chunk (today) and
once one blob per run of G consecutive chunks joined. Only the chunks a backup stores
are used, grouped the way a writer could group them: runs of chunks that are new and
consecutive (day 1: each distinct chunk at its first place; day 2: the chunks day 1
lacks), at most G per blob.

Per variant: stored bytes, and CPU seconds of framing (zstd), sealing (AEAD into packs)
and opening (AEAD, zstd, keyed id of the opened bytes), single-threaded, median of
--runs, all variants in one run, alternating. A real group checks each page's id when
it is opened: for G > 1 the time of one id per group is taken out of the open time and
that of one id per page put in (both measured), so it estimates a real group's. A real
group blob also carries a member table (~36 bytes per page, sealed; reported
separately, not added), so its bytes here are a lower bound.

    .venv/bin/python bench/bench_blob_groups.py day1.db day2.db --groups 1,4,8,16,32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dedupe.chunking import DEFAULT_PARAMS, make_chunker  # noqa: E402
from dedupe.chunking.gear import gear_table  # noqa: E402
from dedupe.chunking.strategy import SNIFF_BYTES, parse_spec, sniff  # noqa: E402
from dedupe.hashing import ChunkHasher  # noqa: E402
from dedupe.store import FinishedPack, PackWriter  # noqa: E402
from dedupe.store.blobs import BlobCodec  # noqa: E402

BATCH = 512  # chunks framed per call, as a backup frames one 2 MiB read of 4 KiB pages
PACK_SIZE = 16 << 20
MEMBER_ROW = 36  # chunk id and raw length per page in a group's member table
PAGE = 4096


def cut(data: bytes, chunker: str, gear: bytes) -> list[bytes]:
    spec = parse_spec(chunker, DEFAULT_PARAMS)
    if spec == "auto":
        spec = sniff(data[:SNIFF_BYTES], DEFAULT_PARAMS)
    c = make_chunker(spec, DEFAULT_PARAMS, gear)
    return [bytes(x) for x in c.feed(data)] + [bytes(x) for x in c.finish()]


def runs_of(flags: Sequence[bool], cap: int) -> list[tuple[int, int]]:
    """(start, end) of each run of True in `flags`, split at `cap` items."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        if start is not None and (not f or i - start == cap):
            out.append((start, i))
            start = i if f else None
    return out


def new_flags(chunks: list[bytes], known: set[bytes]) -> list[bool]:
    """Whether each chunk is stored: not in `known` and not earlier in `chunks`."""
    seen = set(known)
    flags = []
    for c in chunks:
        flags.append(c not in seen)
        seen.add(c)
    return flags


def units(chunks: list[bytes], spans: list[tuple[int, int]]) -> list[bytes]:
    return [b"".join(chunks[a:b]) for a, b in spans]


def timed(fn: Callable[[], object]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def one(
    codec: BlobCodec, hasher: ChunkHasher, blobs: list[bytes], page_ids: bool
) -> dict[str, float]:
    """Frame, seal and open `blobs` the way the pipeline does; CPU seconds and bytes.
    `page_ids`: a blob is a group of pages: opening it checks each page's id (PAGE bytes
    each), not one id of the whole blob."""
    ids = hasher.chunk_ids(blobs)
    writer = PackWriter(PACK_SIZE)
    packs: list[FinishedPack] = []

    frame_s = seal_s = 0.0
    for start in range(0, len(blobs), BATCH):
        part, part_ids = blobs[start : start + BATCH], ids[start : start + BATCH]
        t = time.process_time()
        framed = codec.frame(part, part_ids)
        frame_s += time.process_time() - t
        seal_s += timed(lambda framed=framed: packs.extend(writer.add(framed)))
    last = writer.flush()
    if last is not None:
        packs.append(last)

    def open_all() -> None:
        for pack in packs:
            entries = list(pack.entries())
            for start in range(0, len(entries), BATCH):
                codec.open_joined(pack.key, pack.data, 0, entries[start : start + BATCH])

    open_s = timed(open_all)
    if page_ids:
        # open_joined checked each group's id, one hash of the whole group; a real group
        # checks the id of every page in it. Swap the one cost for the other.
        pages = [b[a : a + PAGE] for b in blobs for a in range(0, len(b), PAGE)]
        open_s += timed(lambda: hasher.chunk_ids(pages)) - timed(lambda: hasher.chunk_ids(blobs))

    return {
        "bytes": float(sum(len(p.data) for p in packs)),
        "frame": frame_s,
        "seal": seal_s,
        "open": open_s,
        "blobs": float(len(blobs)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("day1", type=Path)
    ap.add_argument("day2", type=Path, nargs="?")
    ap.add_argument("--chunker", default="auto", help="auto, fastcdc or fixed:SIZE")
    ap.add_argument("--groups", default="1,4,8,16,32", help="pages per blob, comma-separated")
    ap.add_argument("--level", type=int, default=1, help="zstd level (dedupe's default: 1)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]

    gear = gear_table(os.urandom(32))
    hasher = ChunkHasher(os.urandom(32))
    codec = BlobCodec(args.level, hasher, native=True)
    day1 = cut(args.day1.read_bytes(), args.chunker, gear)
    # What a backup stores: each chunk at its first place (day 2: the ones day 1 lacks).
    days = {"day 1": (day1, new_flags(day1, set()))}
    if args.day2:
        day2 = cut(args.day2.read_bytes(), args.chunker, gear)
        days["day 2 new"] = (day2, new_flags(day2, set(day1)))
    raw = {}
    for name, (chunks, flags) in days.items():
        raw[name] = sum(len(c) for c, f in zip(chunks, flags, strict=True) if f)
        print(
            f"{name}: {len(chunks)} chunks, {sum(flags)} stored, {raw[name] / 1e6:.1f} MB",
            file=sys.stderr,
        )

    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(args.runs):
        for g in groups:
            for name, (chunks, flags) in days.items():
                blobs = units(chunks, runs_of(flags, g))
                results.setdefault((name, g), []).append(one(codec, hasher, blobs, g > 1))

    print(
        f"zstd-{args.level}, medians of {args.runs}; CPU seconds single-threaded; "
        "ratios against one blob per chunk (G=1)"
    )
    head = (
        f"{'data':<10} {'G':>3} {'blobs':>8} {'stored MB':>10} {'bytes':>6} {'+table':>7} "
        f"{'frame s':>8} {'seal s':>7} {'open s':>7} {'frame+seal':>10} {'open':>6}"
    )
    print(head)
    print("-" * len(head))
    for name in days:
        base: dict[str, float] | None = None
        for g in groups:
            runs = results[(name, g)]
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            base = base or m
            table = MEMBER_ROW * raw[name] / 4096 / m["bytes"] if g > 1 else 0.0
            print(
                f"{name:<10} {g:>3} {int(m['blobs']):>8} {m['bytes'] / 1e6:>10.1f} "
                f"{m['bytes'] / base['bytes']:>5.3f}x {table:>6.1%} "
                f"{m['frame']:>8.3f} {m['seal']:>7.3f} {m['open']:>7.3f} "
                f"{(base['frame'] + base['seal']) / (m['frame'] + m['seal']):>9.2f}x "
                f"{base['open'] / m['open']:>5.2f}x"
            )


if __name__ == "__main__":
    main()
