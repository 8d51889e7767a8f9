"""The benchmark's data: sizes, generated database-like files and their next day.

Generated data (seed 1) looks like a database file: 4 KiB pages in runs of 1 to 16, 70% of
the pages text-like rows (Zipf-distributed words: zstd-1 over 16 KiB chunks stores them at
~45%) and 30% random bytes (incompressible blobs: images, already-compressed columns); the
whole file compresses ~1.65x, near the ~1.85x of the SQLite database that
`gen_snapshot.py` makes. Its "next day" (`mutate_data`) rewrites 5% of the pages in place,
in runs of 1 to 8 (updated rows), and appends 1% new pages (inserted rows).
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import blake3

from dedupe.engine.sources import READ_SIZE

__all__ = ["DATA_SEED", "DAY2_SEED", "PAGE_SIZE", "blake3_file", "generate_data", "mutate_data"]

MiB = 1 << 20
PAGE_SIZE = 4096
TEXT_FRACTION = 0.7
DATA_SEED = 1
DAY2_SEED = 2
CHANGED_FRACTION = 0.05  # of day 1's pages, rewritten on day 2
GROWN_FRACTION = 0.01  # of day 1's pages, appended on day 2


def parse_size(text: str) -> int:
    """'256MiB', '1GiB', '64M', '1000000' -> bytes (K/M/G/T are binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (try 256MiB)")
    return int(float(m.group(1)) * (1 << (10 * " kmgt".index(m.group(2) or " "))))


def _text_corpus(rng: random.Random, nbytes: int) -> bytes:
    """Rows of a made-up table: sequential keys, Zipf-distributed words from a 2,000-word
    vocabulary, dates and amounts."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(2000)]
    # Word frequencies fall off as 1/rank (Zipf), as in natural text.
    cum = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(vocab))))
    status = ["active", "closed", "pending", "refunded"]
    rows: list[str] = []
    total = 0
    n = 0
    while total < nbytes:
        n += 1
        words = " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(4, 14)))
        row = (
            f"{n:09d}|{rng.choice(vocab)}@{rng.choice(vocab)}.example|{rng.choice(status)}|"
            f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}|"
            f"{rng.randint(0, 99999)}.{rng.randint(0, 99):02d}|{words}\n"
        )
        rows.append(row)
        total += len(row)
    return "".join(rows).encode()


def _data_blocks(size: int, seed: int) -> Iterator[bytes]:
    """Generated pages, in blocks of whole pages (see the module docstring)."""
    rng = random.Random(seed)
    corpus = _text_corpus(rng, 4 * MiB)
    xof = blake3.blake3(f"dedupe bench blobs, seed {seed}".encode())
    blob_pos = 0
    body = PAGE_SIZE - 16
    pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    per_block = READ_SIZE // PAGE_SIZE
    run_left, text = 0, True
    for start in range(0, pages, per_block):
        parts: list[bytes] = []
        for page in range(start, min(pages, start + per_block)):
            if run_left == 0:
                run_left, text = rng.randint(1, 16), rng.random() < TEXT_FRACTION
            run_left -= 1
            if text:
                # A page header (page number, a log sequence number), then rows.
                off = rng.randrange(len(corpus) - body)
                parts.append(page.to_bytes(8, "little") + (page * 7919).to_bytes(8, "little"))
                parts.append(corpus[off : off + body])
            else:
                parts.append(xof.digest(length=PAGE_SIZE, seek=blob_pos))
                blob_pos += PAGE_SIZE
        yield b"".join(parts)


def _pages(count: int, seed: int) -> Iterator[bytes]:
    for block in _data_blocks(count * PAGE_SIZE, seed):
        for off in range(0, len(block), PAGE_SIZE):
            yield block[off : off + PAGE_SIZE]


def generate_data(path: str | os.PathLike[str], size: int, seed: int = DATA_SEED) -> None:
    """Write `size` bytes of database-like data to `path` (same seed, same bytes). Written
    under a temporary name and renamed when complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    written = 0
    with open(tmp, "wb") as f:
        for block in _data_blocks(size, seed):
            block = block[: size - written]
            f.write(block)
            written += len(block)
            if written >= size:
                break
    os.replace(tmp, path)


def mutate_data(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    seed: int = DAY2_SEED,
    changed: float = CHANGED_FRACTION,
    grown: float = GROWN_FRACTION,
) -> None:
    """Write `src`'s next day to `dst`: `changed` of its pages rewritten in place, in runs
    of 1 to 8 pages at random places, and `grown` of its page count appended (same seed,
    same bytes). Written under a temporary name and renamed when complete."""
    src, dst = Path(src), Path(dst)
    pages = src.stat().st_size // PAGE_SIZE
    rng = random.Random(seed)
    n_changed, n_grown = int(pages * changed), max(1, int(pages * grown))
    chosen: set[int] = set()
    while len(chosen) < n_changed:
        start = rng.randrange(pages)
        chosen.update(range(start, min(pages, start + rng.randint(1, 8))))
    targets = sorted(chosen)[:n_changed]
    fresh = _pages(len(targets) + n_grown, seed)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    with open(tmp, "r+b") as f:
        for page in targets:
            f.seek(page * PAGE_SIZE)
            f.write(next(fresh))
        f.seek(0, os.SEEK_END)
        for new_page in fresh:
            f.write(new_page)
    os.replace(tmp, dst)


def blake3_file(path: str | os.PathLike[str]) -> str:
    """The unkeyed BLAKE3 of a file, hex."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return str(h.hexdigest())
