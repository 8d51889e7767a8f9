"""`dedupe bench`: throughput stage by stage and end to end, on this machine, on your data.

    report = await dedupe.bench.run_bench(size=256 * 2**20, runs=3, compare=True)
    print(dedupe.bench.format_report(report))     # or report.to_dict() for JSON

What it measures (every figure a median over `runs`; MB/s is 10**6 bytes of *input* per
second; machines are shared and noisy, so compare ratios taken within one run, and never
trust one absolute time):

Stages, one thread each, over the same data (at most `size` bytes of it), block by block in
the pipeline's read size as the backup pipeline reads a file: ``read`` (map the file's
windows from the page cache, MapReader; later stages read those pages in place),
``chunk`` (the native FastCDC chunker, repository-default parameters, a keyed gear table),
``hash`` (keyed BLAKE3 chunk ids), ``compress`` (BlobCodec.frame at the default zstd level;
the ratio is reported too), ``seal`` (XChaCha20-Poly1305 in place into a pack-sized buffer)
and ``write`` (write, fsync and rename a 16 MiB pack-like file into the work directory, as
the local backend does). "pipeline bound" is 1 / sum(1 / MB/s) over the CPU stages (read to
seal): what one core would sustain doing all of them; the pipeline spreads them over cores.
The peak RSS shown for stages is the bench process's own (it maps the whole sample).

End to end, through the real command in a fresh local repository per run: ``new`` (back up
the file into an empty repository), ``unchanged`` (back it up again: the stream is read and
chunked again, every chunk is found in the index), ``restore`` (to a file; its BLAKE3 is
compared with the source's, and a wrong restore raises IntegrityError instead of giving a
number) and ``verify`` (``verify --read-data``). Each step is its own ``python -m dedupe``
process: wall time includes interpreter start-up and opening the repository, as users pay
it; the engine's own time is reported beside it. The repositories use the weakest Argon2id
cost (KdfParams.weakest()): the default KDF would add ~0.3 s and 64 MiB to every step and
measure nothing about throughput.

Peak RSS: each measured command is started by a small launcher process that reaps it with
``os.wait4`` and reports its ``ru_maxrss``. The launcher is needed because Linux carries the
memory high-water mark of the parent across vfork + exec: started directly from this
process (which may hold the whole sample, or be the embedding tool), every child would
report at least this process's peak.

``compare``: restic and BorgBackup, when on PATH, back up the same file (new, unchanged) and
restore it in the same run, interleaved with dedupe in an order that rotates from run to
run, each in its own repository with private caches under the work directory (nothing
touches $HOME). Fairness as in bench/bench_e2e.py: ``sync`` before each step, the source
warm in the page cache before each backup, each tool's default compression (borg asked for
lz4 explicitly), and every tool reads the whole file in the unchanged step (restic
``--force``, borg ``--files-cache=disabled``; dedupe always reads a stream whole). Ratios are
dedupe / other, taken within each run, then the median.

Data: ``data`` (a database snapshot of yours), else `size` bytes generated deterministically
(seed 1) to look like a database file: 4 KiB pages in runs of 1 to 16, 70% of the pages
text-like rows (Zipf-distributed words: zstd-1 over 16 KiB chunks stores them at ~45%) and
30% random bytes (incompressible blobs: images, already-compressed columns); the whole file
compresses ~1.65x, near the ~1.85x of the SQLite database bench/bench_e2e.py generates.
It is cached in the work directory (default: a fresh temporary directory, removed
afterwards; never the cwd).
"""

from __future__ import annotations

import asyncio
import compileall
import itertools
import json
import mmap
import os
import platform
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3

import dedupe
from dedupe.api import Repository
from dedupe.chunking import DEFAULT_PARAMS, Block, Chunker, MapReader, gear_table
from dedupe.crypto import KdfParams, new_key
from dedupe.engine.sources import READ_SIZE
from dedupe.errors import DedupeError, IntegrityError
from dedupe.format.config import DEFAULT_COMPRESSION_LEVEL, DEFAULT_PACK_SIZE
from dedupe.hashing import ChunkHasher
from dedupe.store.blobs import BlobCodec, seal_batch

__all__ = [
    "BenchProgress",
    "BenchReport",
    "Measured",
    "Ratio",
    "StageReport",
    "StageResult",
    "StepFailed",
    "StepResult",
    "StepRun",
    "ToolReport",
    "format_report",
    "generate_data",
    "measure_command",
    "parse_size",
    "run_bench",
]

MiB = 1 << 20
DEFAULT_SIZE = 256 * MiB
PAGE_SIZE = 4096
TEXT_FRACTION = 0.7
DATA_SEED = 1
PASSPHRASE = "dedupe-bench-throwaway"  # repositories made and deleted by the benchmark
STAGES = ("read", "chunk", "hash", "compress", "seal", "write")
CPU_STAGES = STAGES[:-1]  # "pipeline bound": write is disk-bound and overlaps the others
STEPS = ("new", "unchanged", "restore", "verify")
COMPARE_STEPS = ("new", "unchanged", "restore")
OTHER_TOOLS = ("restic", "borg")
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB

#: Progress messages ("stage chunk run 2/3: 812 MB/s"), one line each, for a log or stderr.
BenchProgress = Callable[[str], None]


class StepFailed(DedupeError):
    """A measured command exited non-zero (the message carries its last error line)."""


# --------------------------------------------------------------------------- report records


@dataclass(frozen=True)
class StageResult:
    name: str
    bytes: int  # input bytes of one run
    seconds: tuple[float, ...]  # one per run
    mb_s: float  # median
    mb_s_min: float
    mb_s_max: float
    note: str = ""


@dataclass(frozen=True)
class StageReport:
    stages: tuple[StageResult, ...]
    pipeline_bound_mb_s: float  # median over runs of 1 / sum(1 / MB/s) of CPU_STAGES
    compression_ratio: float  # input bytes / framed bytes (zstd or raw, before sealing)
    chunks: int
    sample_bytes: int
    peak_rss_bytes: int  # of the bench process (it maps the sample)


@dataclass(frozen=True)
class StepRun:
    """One measured command."""

    run: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_bytes: int
    mb_s: float  # input bytes / wall
    tool_s: float | None = None  # the time the tool reports itself, when it does
    repo_bytes: int | None = None  # repository size after the step
    flush_s: float | None = None  # restore: fsync of the output left to do afterwards
    verified: bool | None = None  # restore: size and BLAKE3 equal the source's


@dataclass(frozen=True)
class StepResult:
    step: str
    input_bytes: int
    runs: tuple[StepRun, ...]
    mb_s: float  # medians from here on
    mb_s_min: float
    mb_s_max: float
    tool_mb_s: float | None
    durable_mb_s: float | None  # restore: with the fsync the tool left undone
    cpu_s: float
    peak_rss_bytes: int
    repo_bytes: int | None


@dataclass(frozen=True)
class ToolReport:
    name: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    version: str = ""
    compression: str = ""
    steps: tuple[StepResult, ...] = ()

    def step(self, name: str) -> StepResult | None:
        return next((s for s in self.steps if s.step == name), None)


@dataclass(frozen=True)
class Ratio:
    """dedupe / `tool` for one step, median of the per-run ratios (speed: > 1 is dedupe
    faster; peak RSS and repository bytes: < 1 is dedupe smaller)."""

    tool: str
    step: str  # a step, "peak_rss" (largest of the steps) or "repo_bytes" (after new)
    ratio: float


@dataclass(frozen=True)
class BenchReport:
    when: str
    host: dict[str, Any]
    data: dict[str, Any]  # path, bytes, generated, blake3, description
    runs: int
    stages: StageReport | None
    tools: tuple[ToolReport, ...]  # dedupe first, then the compared tools
    ratios: tuple[Ratio, ...]
    notes: tuple[str, ...] = field(default=())

    def tool(self, name: str) -> ToolReport | None:
        return next((t for t in self.tools if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- data


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
    """The generated database, in blocks of whole pages (see the module docstring)."""
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


def _blake3_file(path: str | os.PathLike[str]) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return str(h.hexdigest())


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


def _warm(path: str | os.PathLike[str]) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(READ_SIZE)
        while f.readinto(buf):
            pass


# --------------------------------------------------------------------------- stages


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


def _measure_stages(
    path: str, limit: int, runs: int, workdir: Path, say: BenchProgress
) -> StageReport:
    """Single-threaded, block by block: each stage's time is summed over the blocks."""
    _warm(path)
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


# --------------------------------------------------------------------------- measured children

# Started with `python -I -S -c`: starts in ~10 ms and stays small, so the high-water mark
# it hands to the measured command across vfork + exec is its own, not the bench's.
_LAUNCHER = """\
import json, os, signal, subprocess, sys, time
spec = json.loads(sys.argv[1])
with open(spec["stdin"] or os.devnull, "rb") as i, open(spec["stdout"], "wb") as o, \\
        open(spec["stderr"], "wb") as e:
    t0 = time.perf_counter()
    p = subprocess.Popen(spec["argv"], stdin=i, stdout=o, stderr=e, cwd=spec["cwd"])
    signal.signal(signal.SIGTERM, lambda *_: p.terminate())
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"rc": p.returncode, "wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime,
                  "maxrss": ru.ru_maxrss}))
"""


@dataclass
class Measured:
    argv: list[str]
    rc: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_bytes: int
    stdout: bytes
    stderr: bytes

    def failure(self) -> str:
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1] if lines else "(no error output)"
        return f"`{' '.join(self.argv[:3])} ...` exited with {self.rc}: {last}"


async def measure_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str],
    scratch: Path,
    stdin: str | None = None,
) -> Measured:
    """Run `argv` to completion as a grandchild, through the launcher, and return its wall
    time, CPU time and peak RSS (its own, not this process's: see the module docstring).
    stdout and stderr go to files in `scratch` (no pipe to drain while the clock runs) and
    are read afterwards; `stdin` is a file path, else /dev/null. Cancelling terminates the
    launcher, which terminates the command."""
    out, err = scratch / "stdout", scratch / "stderr"
    args = [str(a) for a in argv]
    spec = {
        "argv": args,
        "cwd": os.fspath(cwd),
        "stdin": stdin,
        "stdout": str(out),
        "stderr": str(err),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-S",
        "-c",
        _LAUNCHER,
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )
    try:
        report, launcher_err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"bench launcher failed: {launcher_err.decode(errors='replace')}")
    r = json.loads(report)
    return Measured(
        argv=args,
        rc=r["rc"],
        wall_s=r["wall"],
        user_s=r["user"],
        sys_s=r["sys"],
        maxrss_bytes=r["maxrss"] * _MAXRSS_UNIT,
        stdout=out.read_bytes(),
        stderr=err.read_bytes(),
    )


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _fsync_time(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _last_json(raw: bytes) -> dict[str, Any]:
    text = raw.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if ln.lstrip().startswith("{")]
        if not lines:
            raise RuntimeError(f"no JSON object in the output: {text[-300:]!r}") from None
        obj = json.loads(lines[-1])
    if not isinstance(obj, dict):
        raise RuntimeError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass
class _Source:
    path: Path
    size: int
    digest: str  # unkeyed BLAKE3


@dataclass
class _Env:
    workdir: Path
    base: dict[str, str]
    say: BenchProgress


class _ToolFailed(Exception):
    """A compared tool failed (reported in its row; it does not stop the benchmark)."""


class _Tool:
    """One program, in one fresh repository per run."""

    name = ""
    compression = ""

    def __init__(self, env: _Env, rundir: Path) -> None:
        self.rundir = rundir
        self.repo = rundir / "repo"
        self.scratch = rundir / "scratch"
        self.env = dict(env.base)
        self.bench = env

    @staticmethod
    def missing() -> str | None:
        return None

    async def version(self) -> str:
        return ""

    async def init(self) -> None:
        raise NotImplementedError

    def backup_argv(self, src: _Source, label: str, again: bool) -> list[str]:
        raise NotImplementedError

    def parse_backup(self, stdout: bytes) -> tuple[str, float | None]:
        """(snapshot id, the tool's own seconds)"""
        raise NotImplementedError

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        """(argv, cwd)"""
        raise NotImplementedError

    async def run(self, argv: Sequence[str], cwd: Path | None = None) -> Measured:
        m = await measure_command(argv, env=self.env, cwd=cwd or self.rundir, scratch=self.scratch)
        if m.rc != 0:
            raise self.error(m.failure())
        return m

    def error(self, message: str) -> Exception:
        return _ToolFailed(message)

    def wrong_restore(self, message: str) -> Exception:
        return _ToolFailed(message)


class _Dedupe(_Tool):
    name = "dedupe"
    compression = f"zstd-{DEFAULT_COMPRESSION_LEVEL}"

    def __init__(self, env: _Env, rundir: Path) -> None:
        super().__init__(env, rundir)
        for other in ("DEDUPE_PASSWORD_FILE", "DEDUPE_PASSWORD_COMMAND"):
            self.env.pop(other, None)  # one passphrase source, or dedupe refuses to guess
        self.env.update(DEDUPE_REPO=str(self.repo), DEDUPE_PASSWORD=PASSPHRASE)

    async def version(self) -> str:
        return f"dedupe {dedupe.__version__}"

    async def init(self) -> None:
        repo = await Repository.init(self.repo, PASSPHRASE, kdf=KdfParams.weakest())
        await repo.close()

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dedupe", *args]

    def backup_argv(self, src: _Source, label: str, again: bool) -> list[str]:
        return self.cmd("backup", str(src.path), "--name", "bench", "--json")

    def parse_backup(self, stdout: bytes) -> tuple[str, float | None]:
        info = _last_json(stdout)
        return str(info["id"]), float(info["seconds"])

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        return self.cmd("restore", snapshot, str(target / "restored.db"), "--json"), target

    def error(self, message: str) -> Exception:
        return StepFailed(message, hint="run the same command by hand to see the whole error")

    def wrong_restore(self, message: str) -> Exception:
        return IntegrityError(f"benchmark restore: {message}")


class _Restic(_Tool):
    name = "restic"
    compression = "auto (zstd)"

    def __init__(self, env: _Env, rundir: Path) -> None:
        super().__init__(env, rundir)
        self.env.update(
            RESTIC_REPOSITORY=str(self.repo),
            RESTIC_PASSWORD=PASSPHRASE,
            RESTIC_CACHE_DIR=str(rundir / "cache"),
        )

    @staticmethod
    def missing() -> str | None:
        return None if shutil.which("restic") else "not installed"

    async def version(self) -> str:
        m = await measure_command(
            ["restic", "version"], env=self.env, cwd=self.rundir, scratch=self.scratch
        )
        return m.stdout.decode(errors="replace").strip().splitlines()[0] if m.rc == 0 else "?"

    async def init(self) -> None:
        argv = ["restic", "init"]
        m = await measure_command(
            ["restic", "init", "--help"], env=self.env, cwd=self.rundir, scratch=self.scratch
        )
        if b"--repository-version" in m.stdout:  # v2 is the format with compression
            argv += ["--repository-version", "2"]
        await self.run(argv)

    def backup_argv(self, src: _Source, label: str, again: bool) -> list[str]:
        # --force: read the file even though the parent snapshot says it is unchanged.
        force = ["--force"] if again else []
        return ["restic", "backup", "--json", "--host", "bench", *force, str(src.path)]

    def parse_backup(self, stdout: bytes) -> tuple[str, float | None]:
        summary: dict[str, Any] = {}
        for line in stdout.decode("utf-8", "replace").splitlines():
            if '"summary"' in line:
                summary = json.loads(line)
        if "snapshot_id" not in summary:
            raise _ToolFailed("restic printed no summary")
        own = summary.get("total_duration")
        return str(summary["snapshot_id"]), float(own) if own is not None else None

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        return ["restic", "restore", snapshot, "--target", str(target)], target


class _Borg(_Tool):
    name = "borg"
    compression = "lz4"

    def __init__(self, env: _Env, rundir: Path) -> None:
        super().__init__(env, rundir)
        self.env.update(
            BORG_PASSPHRASE=PASSPHRASE,
            BORG_BASE_DIR=str(rundir / "borgbase"),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_DISPLAY_PASSPHRASE="no",
        )
        self.src_dir: Path | None = None

    @staticmethod
    def missing() -> str | None:
        return None if shutil.which("borg") else "not installed"

    async def version(self) -> str:
        m = await measure_command(
            ["borg", "--version"], env=self.env, cwd=self.rundir, scratch=self.scratch
        )
        return m.stdout.decode(errors="replace").strip() if m.rc == 0 else "?"

    async def init(self) -> None:
        m = await measure_command(
            ["borg", "init", "--help"], env=self.env, cwd=self.rundir, scratch=self.scratch
        )
        mode = "repokey-blake2" if b"repokey-blake2" in m.stdout else "repokey"
        await self.run(["borg", "init", "-e", mode, str(self.repo)])

    def backup_argv(self, src: _Source, label: str, again: bool) -> list[str]:
        cache = ["--files-cache=disabled"] if again else []
        return [
            "borg",
            "create",
            "--json",
            "--compression",
            "lz4",
            *cache,
            f"{self.repo}::{label}",
            str(src.path),
        ]

    def parse_backup(self, stdout: bytes) -> tuple[str, float | None]:
        info = _last_json(stdout)
        return str(info["archive"]["name"]), float(info["archive"]["duration"])

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        return ["borg", "extract", f"{self.repo}::{snapshot}"], target


_TOOLS: dict[str, type[_Tool]] = {"dedupe": _Dedupe, "restic": _Restic, "borg": _Borg}


def _run_record(run: int, m: Measured, nbytes: int, own: float | None = None, **kw: Any) -> StepRun:
    return StepRun(
        run=run,
        wall_s=m.wall_s,
        user_s=m.user_s,
        sys_s=m.sys_s,
        maxrss_bytes=m.maxrss_bytes,
        mb_s=nbytes / m.wall_s / 1e6,
        tool_s=own,
        **kw,
    )


async def _one_run(
    cls: type[_Tool], run: int, src: _Source, env: _Env, steps: Sequence[str]
) -> dict[str, StepRun]:
    """Every step of one tool in a fresh repository. Raises the tool's error on failure."""
    rundir = env.workdir / "runs" / cls.name
    shutil.rmtree(rundir, ignore_errors=True)
    tool = cls(env, rundir)
    tool.scratch.mkdir(parents=True)
    out: dict[str, StepRun] = {}
    try:
        await tool.init()
        snapshot = ""
        for step, label in (("new", "new"), ("unchanged", "unchanged")):
            if step not in steps:
                continue
            os.sync()
            _warm(src.path)
            m = await tool.run(tool.backup_argv(src, label, again=step == "unchanged"))
            snap, own = tool.parse_backup(m.stdout)
            snapshot = snapshot or snap
            out[step] = _run_record(run, m, src.size, own, repo_bytes=_tree_bytes(tool.repo))
            env.say(f"run {run + 1} {cls.name} {step}: {out[step].mb_s:.1f} MB/s")
        if "restore" in steps:
            target = rundir / "restore"
            target.mkdir()
            os.sync()
            argv, cwd = tool.restore_argv(snapshot, target)
            m = await tool.run(argv, cwd)
            files = [Path(d) / f for d, _, fs in os.walk(target) for f in fs]
            if len(files) != 1:
                raise tool.wrong_restore(f"expected 1 restored file, found {len(files)}")
            flush = _fsync_time(files[0])
            size, digest = files[0].stat().st_size, _blake3_file(files[0])
            if size != src.size or digest != src.digest:
                raise tool.wrong_restore(
                    f"{cls.name} restored {size} bytes with BLAKE3 {digest[:16]}, the source "
                    f"has {src.size} bytes with BLAKE3 {src.digest[:16]}"
                )
            own = None
            if cls is _Dedupe:
                own = float(_last_json(m.stdout)["seconds"])
            out["restore"] = _run_record(run, m, src.size, own, flush_s=flush, verified=True)
            shutil.rmtree(target)
            env.say(f"run {run + 1} {cls.name} restore: {out['restore'].mb_s:.1f} MB/s, verified")
        if "verify" in steps:
            os.sync()
            m = await tool.run([sys.executable, "-m", "dedupe", "verify", "--read-data", "--json"])
            rep = _last_json(m.stdout)
            out["verify"] = _run_record(run, m, src.size, float(rep["seconds"]))
            env.say(f"run {run + 1} {cls.name} verify: {out['verify'].mb_s:.1f} MB/s")
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return out


def _median_step(step: str, nbytes: int, runs: list[StepRun]) -> StepResult:
    med = statistics.median
    own = [nbytes / r.tool_s / 1e6 for r in runs if r.tool_s]
    durable = [nbytes / (r.wall_s + r.flush_s) / 1e6 for r in runs if r.flush_s is not None]
    repo = [r.repo_bytes for r in runs if r.repo_bytes is not None]
    return StepResult(
        step=step,
        input_bytes=nbytes,
        runs=tuple(runs),
        mb_s=med(r.mb_s for r in runs),
        mb_s_min=min(r.mb_s for r in runs),
        mb_s_max=max(r.mb_s for r in runs),
        tool_mb_s=med(own) if own else None,
        durable_mb_s=med(durable) if durable else None,
        cpu_s=med(r.user_s + r.sys_s for r in runs),
        peak_rss_bytes=int(med(r.maxrss_bytes for r in runs)),
        repo_bytes=int(med(repo)) if repo else None,
    )


def _ratios(per_run: dict[str, dict[int, dict[str, StepRun]]]) -> list[Ratio]:
    """dedupe / other, within each run, then the median over the runs both completed."""
    ref = per_run.get("dedupe", {})
    out = []
    for tool in OTHER_TOOLS:
        other = per_run.get(tool, {})
        shared = sorted(set(ref) & set(other))
        if not shared:
            continue
        for step in COMPARE_STEPS:
            vals = [
                ref[r][step].mb_s / other[r][step].mb_s
                for r in shared
                if step in ref[r] and step in other[r]
            ]
            if vals:
                out.append(Ratio(tool, step, statistics.median(vals)))
        rss = [
            max(s.maxrss_bytes for k, s in ref[r].items() if k in COMPARE_STEPS)
            / max(s.maxrss_bytes for s in other[r].values())
            for r in shared
        ]
        out.append(Ratio(tool, "peak_rss", statistics.median(rss)))
        repo = [
            ref[r]["new"].repo_bytes / other[r]["new"].repo_bytes  # type: ignore[operator]
            for r in shared
            if "new" in ref[r] and "new" in other[r] and other[r]["new"].repo_bytes
        ]
        if repo:
            out.append(Ratio(tool, "repo_bytes", statistics.median(repo)))
    return out


async def _end_to_end(
    src: _Source, runs: int, compare: bool, env: _Env
) -> tuple[list[ToolReport], list[Ratio]]:
    tools: list[type[_Tool]] = [_Dedupe]
    skipped: dict[str, str] = {}
    if compare:
        for name in OTHER_TOOLS:
            why = _TOOLS[name].missing()
            if why:
                skipped[name] = why
                env.say(f"{name}: skipped ({why})")
            else:
                tools.append(_TOOLS[name])
    per_run: dict[str, dict[int, dict[str, StepRun]]] = {t.name: {} for t in tools}
    failed: dict[str, str] = {}
    for run in range(runs):
        k = run % len(tools)
        for cls in tools[k:] + tools[:k]:  # rotate: no tool always goes first
            if cls.name in failed:
                continue
            steps = STEPS if cls is _Dedupe else COMPARE_STEPS
            try:
                per_run[cls.name][run] = await _one_run(cls, run, src, env, steps)
            except _ToolFailed as e:  # dedupe's own failures propagate as DedupeErrors
                failed[cls.name] = str(e)
                env.say(f"{cls.name}: FAILED: {e}")
    reports: list[ToolReport] = []
    probe_dir = env.workdir / "runs" / "probe"
    (probe_dir / "scratch").mkdir(parents=True, exist_ok=True)
    for cls in tools:
        probe = cls(env, probe_dir)
        version = await probe.version()
        if cls.name in failed:
            reports.append(ToolReport(cls.name, "failed", failed[cls.name], version))
            continue
        steps = STEPS if cls is _Dedupe else COMPARE_STEPS
        results = tuple(
            _median_step(s, src.size, [r[s] for r in per_run[cls.name].values()]) for s in steps
        )
        reports.append(ToolReport(cls.name, "ok", "", version, cls.compression, results))
    shutil.rmtree(probe_dir, ignore_errors=True)
    for name, why in skipped.items():
        reports.append(ToolReport(name, "skipped", why))
    ok = {n: v for n, v in per_run.items() if n not in failed}
    return reports, _ratios(ok)


# --------------------------------------------------------------------------- entry point


def _child_env(workdir: Path) -> dict[str, str]:
    """The environment of every measured command: no DEDUPE_* of the caller, a private HOME
    and caches under the work directory, and this very dedupe package on the import path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    pkg_root = str(Path(dedupe.__file__).resolve().parent.parent)
    pp = env.get("PYTHONPATH")
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        LC_ALL="C.UTF-8",
        LANG="C.UTF-8",
        PYTHONPATH=pkg_root + (os.pathsep + pp if pp else ""),
    )
    return env


async def run_bench(
    *,
    data: str | os.PathLike[str] | None = None,
    size: int = DEFAULT_SIZE,
    runs: int = 3,
    workdir: str | os.PathLike[str] | None = None,
    compare: bool = False,
    stages: bool = True,
    end_to_end: bool = True,
    progress: BenchProgress | None = None,
) -> BenchReport:
    """Measure this machine (see the module docstring for what and how).

    `data`: a file to back up (e.g. a database snapshot); else `size` bytes are generated.
    With `data`, the stage table uses at most its first `size` bytes (they are held in
    memory); the end-to-end steps use the whole file. `workdir`: where data, repositories
    and caches go (default: a new temporary directory, removed afterwards; a given one is
    kept, with the generated data cached in it). Raises IntegrityError when dedupe restores
    wrong bytes, StepFailed when a dedupe command fails, ValueError for bad arguments.
    Cancelling stops the running command."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    if size < PAGE_SIZE:
        raise ValueError(f"size must be at least {PAGE_SIZE} bytes")
    say: BenchProgress = progress or (lambda _msg: None)
    own_dir = workdir is None
    wdir = Path(tempfile.mkdtemp(prefix="dedupe-bench-")) if own_dir else Path(workdir or "")
    wdir = wdir.resolve()
    wdir.mkdir(parents=True, exist_ok=True)
    try:
        if data is not None:
            path = Path(data).resolve()
            if not path.is_file():
                raise ValueError(f"{data}: not a file")
            description = "given file"
        else:
            path = wdir / f"bench-data-{size}-seed{DATA_SEED}.db"
            if not path.exists() or path.stat().st_size != size:
                say(f"generating {size / MiB:.0f} MiB of database-like data in {path}")
                await asyncio.to_thread(generate_data, path, size)
            description = (
                f"generated (seed {DATA_SEED}): {PAGE_SIZE} B pages in runs of 1-16, "
                f"{TEXT_FRACTION:.0%} text-like rows, {1 - TEXT_FRACTION:.0%} random blobs"
            )
        src = _Source(path, path.stat().st_size, await asyncio.to_thread(_blake3_file, path))
        # The commands import dedupe from where this process does: byte-compile it once,
        # as `pip install` does, so that no measured command compiles modules from source
        # (it would whenever PYTHONDONTWRITEBYTECODE is set).
        await asyncio.to_thread(compileall.compile_dir, Path(__file__).parent, quiet=1)
        stage_report = None
        if stages:
            stage_report = await asyncio.to_thread(
                _measure_stages, str(path), size, runs, wdir, say
            )
        tools: list[ToolReport] = []
        ratios: list[Ratio] = []
        if end_to_end:
            env = _Env(wdir, _child_env(wdir), say)
            tools, ratios = await _end_to_end(src, runs, compare, env)
        notes = [
            "MB/s = 1e6 bytes of input per second; medians of the runs; ratios taken "
            "within each run",
            "end-to-end wall times include process start-up and repository open; "
            "dedupe repositories use the weakest Argon2id (KdfParams.weakest())",
        ]
        return BenchReport(
            when=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            host={
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
                "dedupe": dedupe.__version__,
            },
            data={
                "path": str(path),
                "bytes": src.size,
                "generated": data is None,
                "blake3": src.digest,
                "description": description,
            },
            runs=runs,
            stages=stage_report,
            tools=tuple(tools),
            ratios=tuple(ratios),
            notes=tuple(notes),
        )
    finally:
        if own_dir:
            shutil.rmtree(wdir, ignore_errors=True)
        else:
            shutil.rmtree(wdir / "runs", ignore_errors=True)


# --------------------------------------------------------------------------- table


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """The first `left` columns (names, words) left-aligned, the rest (numbers) right-aligned;
    a row of two cells (name, message) spans the table."""
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(c) for c in col) for col in zip(header, *full, strict=True)]
    widths[0] = max([widths[0], *(len(r[0]) for r in rows)])

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append(f"{r[0].ljust(widths[0])}  {r[1]}" if len(r) != len(header) else line(r))
    return "\n".join(out)


def _mib(n: float) -> str:
    return f"{n / MiB:.0f}"


def format_report(report: BenchReport) -> str:
    """The report as tables for a terminal."""
    d, h = report.data, report.host
    out = [
        f"dedupe {h['dedupe']} bench: {d['bytes'] / 1e6:.1f} MB ({d['description']}), "
        f"{report.runs} run(s), {h['cpus']} CPUs, Python {h['python']}",
    ]
    st = report.stages
    if st is not None:
        out.append("")
        out.append(
            f"Stages (one thread each, {st.sample_bytes / 1e6:.1f} MB mapped, {st.chunks} chunks):"
        )
        rows = [
            [s.name, s.note, f"{s.mb_s:.1f}", f"{s.mb_s_min:.0f}..{s.mb_s_max:.0f}"]
            for s in st.stages
        ]
        rows.append(
            ["pipeline bound", "1 / sum(1 / MB/s), read..seal", f"{st.pipeline_bound_mb_s:.1f}", ""]
        )
        out.append(_table(["stage", "what", "MB/s", "min..max"], rows, left=2))
        out.append(f"bench process peak RSS {_mib(st.peak_rss_bytes)} MiB (maps the sample)")
    if report.tools:
        out.append("")
        out.append("End to end (each step a separate process; MB/s of input, wall clock):")
        header = [
            "tool",
            "compression",
            "new",
            "unchanged",
            "restore",
            "+fsync",
            "verify",
            "repo MB",
            "peak RSS MiB n/u/r/v",
        ]
        rows = []
        for t in report.tools:
            if t.status != "ok":
                rows.append([t.name, f"{t.status}: {t.reason}"])
                continue

            def cell(step: str, t: ToolReport = t) -> str:
                s = t.step(step)
                return f"{s.mb_s:.1f}" if s else "-"

            new, rest = t.step("new"), t.step("restore")
            rows.append(
                [
                    t.name,
                    t.compression,
                    cell("new"),
                    cell("unchanged"),
                    cell("restore"),
                    f"{rest.durable_mb_s:.1f}" if rest and rest.durable_mb_s else "-",
                    cell("verify"),
                    f"{new.repo_bytes / 1e6:.1f}" if new and new.repo_bytes else "-",
                    "/".join(_mib(s.peak_rss_bytes) if (s := t.step(k)) else "-" for k in STEPS),
                ]
            )
        out.append(_table(header, rows, left=2))
        dd = report.tool("dedupe")
        if dd is not None and dd.status == "ok":
            own = [f"{s.step} {s.tool_mb_s:.1f}" for s in dd.steps if s.tool_mb_s is not None]
            out.append("dedupe's own timing (no start-up, no open), MB/s: " + ", ".join(own))
        noisy = [
            f"{t.name} {s.step} {s.mb_s_min:.0f}..{s.mb_s_max:.0f}"
            for t in report.tools
            for s in t.steps
            if len(s.runs) > 1 and s.mb_s_max - s.mb_s_min > 0.25 * s.mb_s
        ]
        if noisy:
            out.append("spread > 25% of the median (MB/s min..max): " + "; ".join(noisy))
    if report.ratios:
        out.append("")
        out.append("dedupe / other, per run then median (speed > 1: dedupe faster; RSS, bytes")
        out.append("< 1: dedupe smaller):")
        cols = [*COMPARE_STEPS, "peak_rss", "repo_bytes"]
        rows = []
        for tool in OTHER_TOOLS:
            got = {r.step: r.ratio for r in report.ratios if r.tool == tool}
            if got:
                rows.append([tool, *(f"{got[c]:.2f}x" if c in got else "-" for c in cols)])
        out.append(_table(["vs", *cols], rows))
    out.append("")
    out.extend(f"note: {n}" for n in report.notes)
    return "\n".join(out)
