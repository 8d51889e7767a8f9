"""Throughput stage by stage, one thread each, over the same data.

Block by block in the pipeline's read size, as the backup pipeline reads a file: ``read``
(map the file's windows, MapReader; later stages read those pages in place), ``chunk`` (the
native FastCDC chunker, repository-default parameters, a keyed gear table), ``hash`` (keyed
BLAKE3 chunk ids), ``compress`` (BlobCodec.frame at the default zstd level; the ratio is
reported too), ``seal`` (XChaCha20-Poly1305 in place into a pack-sized buffer) and ``write``
(write, fsync and rename a 16 MiB pack-like file, as the local backend does). "pipeline
bound" is 1 / sum(1 / MB/s) over the CPU stages (read to seal): what one core would sustain
doing all of them; the pipeline spreads them over cores.
"""

from __future__ import annotations

import mmap
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

from dedupe.bench.measure import warm
from dedupe.bench.report import CPU_STAGES, STAGES, BenchProgress, StageReport, StageResult
from dedupe.chunking import DEFAULT_PARAMS, Block, Chunker, MapReader, gear_table
from dedupe.crypto import new_key
from dedupe.engine.sources import READ_SIZE
from dedupe.format.config import DEFAULT_COMPRESSION_LEVEL, DEFAULT_PACK_SIZE
from dedupe.hashing import ChunkHasher
from dedupe.store.blobs import BlobCodec, seal_batch

__all__ = ["measure_stages"]

MiB = 1 << 20
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB


def _map_windows(path: str, total: int) -> list[Block | memoryview]:
    """The first `total` bytes of path as the engine reads a file: MapReader windows."""
    reader = MapReader(READ_SIZE)
    windows: list[Block | memoryview] = []
    got = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while got < total and (w := reader.read(fd)) is not None:
            windows.append(w if got + len(w) <= total else memoryview(w)[: total - got])
            got += len(windows[-1])
    finally:
        os.close(fd)
    return windows


def _evict(path: str) -> None:
    """Ask the kernel to drop the file's clean pages from the page cache (no effect on
    tmpfs, whose pages are the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):  # not Linux, or a file system without it
        pass
    finally:
        os.close(fd)


def _touch(block: Block | memoryview) -> int:
    """Read one byte of every page of a window, so that each is faulted in."""
    view = memoryview(block).cast("B")
    return sum(view[:: mmap.PAGESIZE])


def _median_stage(name: str, nbytes: int, seconds: list[float], note: str = "") -> StageResult:
    rates = [nbytes / s / 1e6 if s > 0 else float("inf") for s in seconds]
    return StageResult(
        name,
        nbytes,
        tuple(seconds),
        statistics.median(rates),
        min(rates),
        max(rates),
        note,
    )


def measure_stages(
    path: str, limit: int, runs: int, workdir: Path, say: BenchProgress
) -> StageReport:
    """Single-threaded, block by block: each stage's time is summed over the blocks."""
    warm(path)
    total = min(limit, os.path.getsize(path))
    if not total:
        raise ValueError(f"{path} is empty: nothing to measure")
    chunker = Chunker(DEFAULT_PARAMS, gear_table(new_key()))
    hasher = ChunkHasher(new_key())
    codec = BlobCodec(DEFAULT_COMPRESSION_LEVEL, hasher)
    pack_key = new_key()
    pack = bytearray(DEFAULT_PACK_SIZE + 64 * 1024)
    records = bytearray()
    wdir = workdir / "stage-write"
    wdir.mkdir(parents=True, exist_ok=True)
    n_packs = max(1, round(total / DEFAULT_PACK_SIZE))
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    bounds: list[float] = []
    framed = chunks = 0
    clock = time.perf_counter
    for run in range(runs):
        t = dict.fromkeys(STAGES, 0.0)
        # read: the engine's reader for a file (MapReader: mapped windows of the
        # pipeline's read size), the file's pages first dropped from the page cache and
        # then every one faulted in, so that this is what bringing the bytes in costs
        # (mapping alone costs nothing: it once reported hundreds of GB/s). The later
        # stages read those pages in place, as the engine's do.
        _evict(path)
        t0 = clock()
        blocks = _map_windows(path, total)
        for block in blocks:
            _touch(block)
        t["read"] = clock() - t0
        framed = chunks = 0
        pos = 0
        for i, block in enumerate(blocks):
            t0 = clock()
            cs = chunker.feed(block)
            if i == len(blocks) - 1:
                cs += chunker.finish()
            t1 = clock()
            ids = hasher.chunk_ids(cs)
            t2 = clock()
            batch = codec.frame(cs, ids)
            t3 = clock()
            framed += batch.framed_bytes
            while batch.pending:
                pos = seal_batch(pack_key, batch, pack, pos, len(pack), records)
                if batch.pending:
                    pos = 0  # the pack is full: start the next one in the same buffer
                    records.clear()
            t4 = clock()
            t["chunk"] += t1 - t0
            t["hash"] += t2 - t1
            t["compress"] += t3 - t2
            t["seal"] += t4 - t3
            chunks += len(cs)
            del cs, ids, batch
        del blocks, block  # unmap this run's windows
        os.sync()  # earlier writes are not billed to this stage
        for k in range(n_packs):
            name = wdir / f"pack-{k}"
            tmp = wdir / f"pack-{k}.tmp"
            t0 = clock()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(pack)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name)
            dfd = os.open(wdir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            t["write"] += clock() - t0
        for k in range(n_packs):
            (wdir / f"pack-{k}").unlink()
        for s in STAGES:
            times[s].append(t[s])
        rates = {s: (n_packs * len(pack) if s == "write" else total) / t[s] / 1e6 for s in STAGES}
        bounds.append(1 / sum(1 / rates[s] for s in CPU_STAGES))
        say(
            f"stages run {run + 1}/{runs}: "
            + ", ".join(f"{s} {rates[s]:.0f}" for s in STAGES)
            + " MB/s"
        )
    shutil.rmtree(wdir, ignore_errors=True)
    ratio = total / framed if framed else 1.0
    notes = {
        "read": f"{READ_SIZE // MiB} MiB mapped windows, uncached, all pages faulted in",
        "chunk": f"FastCDC {DEFAULT_PARAMS.min_size // 1024}/{DEFAULT_PARAMS.avg_size // 1024}/"
        f"{DEFAULT_PARAMS.max_size // 1024} KiB, keyed gear",
        "hash": "keyed BLAKE3 chunk ids",
        "compress": f"zstd-{DEFAULT_COMPRESSION_LEVEL}, ratio {ratio:.2f}x",
        "seal": "XChaCha20-Poly1305 into a pack buffer",
        "write": f"{n_packs} x {DEFAULT_PACK_SIZE // MiB} MiB, write+fsync+rename",
    }
    results = tuple(
        _median_stage(s, n_packs * len(pack) if s == "write" else total, times[s], notes[s])
        for s in STAGES
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT
    return StageReport(
        stages=results,
        pipeline_bound_mb_s=statistics.median(bounds),
        compression_ratio=ratio,
        chunks=chunks,
        sample_bytes=total,
        peak_rss_bytes=peak,
    )
