"""The restore pipeline.

The generation's chunk table, read piece by piece (from a file: it is never held whole),
is cut into windows of about WINDOW_BYTES of output. Each window is planned in one
native call (csrc/windowplan.h): its chunks located, each distinct chunk once, grouped by
pack; neighbouring blobs are read with one ranged get (gaps under COALESCE_GAP are read
through), ranges are fetched concurrently, and each range is opened on the executor
straight into the window's output buffer: AEAD under the chunk id, decompression, keyed
BLAKE3 against the id. Repeated chunks are then copied from their first place. Only
then is the window handed out, while the next one is being fetched. The whole-stream
digest is checked at the end; a chunk that fails any check raises before a byte of it is
handed out. A window's buffer starts on a page, and its bytes start where their offset
in the stream puts them modulo the page size (Window.align): a restore to a file writes
them from there with O_DIRECT, uncopied (outfile.py).
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any, BinaryIO, TypeVar

from dedupe.crypto.aead import Buffer
from dedupe.engine.outfile import OutputFile, writev_all
from dedupe.errors import IntegrityError, MissingObject, ReaderGone, TargetError
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.hashing import StreamDigest
from dedupe.store import RepositoryStore
from dedupe.store.blobs import release_buffers
from dedupe.store.index import PLAN_LENGTH, cut_records
from dedupe.store.readbuffers import ReadBuffers

T = TypeVar("T")

# Up to five windows are alive at once (two queued, one being fetched, one being written,
# the previous one's digest finishing), and the ranges read for one are shorter than it:
# at 16 MiB a 1 GiB incremental's restore peaked at 155 MiB, at 8 MiB 109 MiB, for the
# same CPU time (bench/README.md, "Restore windows").
WINDOW_BYTES = 8 * 1024 * 1024
COALESCE_GAP = 256 * 1024
MAX_RANGE = 8 * 1024 * 1024
FETCH_CONCURRENCY = 4
OPENING_RANGES = 2  # ranges read and waiting to be opened, beside those being read
# Bytes of read buffers held at once (ReadBuffers), for peak RSS: two MAX_RANGE reads with
# their 1/8 headroom (18 MiB) and 2 MiB for short ranges beside them. The count alone let
# them reach 6 x 9 MiB; traced at restore peaks, 16.4 MiB (1 GiB) and 23.1 MiB (4 GiB
# incremental; bench/README.md), so this bites on the large side only.
READ_BUFFER_BUDGET = 20 * 1024 * 1024
DECODE_BATCH = 1024 * 1024  # stored bytes opened per executor job
WINDOWS_AHEAD = 2

# (chunk id, offset in pack, stored length, raw length)
_Item = tuple[bytes, int, int, int]


def _windows(table: Iterable[Buffer]) -> Iterator[bytes]:
    """The table's records cut into windows of about WINDOW_BYTES of output each (a
    window ends with the record that reaches it). Each window is its own bytes: pieces
    may be buffers that the table reuses."""
    pending = bytearray()  # records of a window that began in an earlier piece
    pending_size = 0
    for piece in table:
        records = memoryview(piece).cast("B")
        count = len(records) // CHUNK_RECORD.size
        start = 0
        while start < count:
            end, size = cut_records(records, start, WINDOW_BYTES - pending_size)
            pending += records[start * CHUNK_RECORD.size : end * CHUNK_RECORD.size]
            pending_size += size
            start = end
            if pending_size >= WINDOW_BYTES:
                yield bytes(pending)
                pending, pending_size = bytearray(), 0
    if pending:
        yield bytes(pending)


def split_by_bytes(items: list[_Item], batch_bytes: int) -> Iterator[list[_Item]]:
    """Consecutive runs of (chunk id, offset, stored length, raw length) items holding
    about `batch_bytes` stored bytes each: one executor job apiece."""
    part: list[_Item] = []
    size = 0
    for it in items:
        part.append(it)
        size += it[2]
        if size >= batch_bytes:
            yield part
            part, size = [], 0
    if part:
        yield part


class Window(list[Buffer]):
    """A window's verified bytes in stream order. With `per_chunk`, one buffer per chunk;
    otherwise one buffer for the whole window: a digest update and an iovec per window,
    not per 4 KiB page. `chunks` counts the chunks either way. `align`, when not 0: the
    window's memory lies at an address congruent to its offset in the stream modulo
    `align`, so that every aligned stream offset in it is an aligned address too (an
    OutputFile writes such a window with O_DIRECT from where it lies)."""

    __slots__ = ("align", "chunks")

    def __init__(self, chunks: int, align: int = 0) -> None:
        super().__init__()
        self.chunks = chunks
        self.align = align


async def restore_chunks(
    store: RepositoryStore,
    gen_id: str,
    table: Iterable[Buffer],
    digest_hex: str | None,
    executor: Executor,
    *,
    per_chunk: bool = False,
) -> AsyncGenerator[Window, None]:
    """Yield the generation's bytes as Windows of verified chunks, in order.
    `table` is its complete chunk table in pieces of whole CHUNK_RECORDs, read as the
    windows are needed; when it has a close() (a SpilledTable), it is closed however
    the stream ends.
    With `digest_hex`, the whole stream is checked against it at the end (callers that
    check per-file digests pass None). `per_chunk` hands out one buffer per chunk (a tree
    restore cuts the stream into files by chunk count)."""
    loop = asyncio.get_running_loop()
    index = store.index
    codec = store.codec
    sem = asyncio.Semaphore(FETCH_CONCURRENCY)

    # A range holds its buffer from its read until its chunks are opened (out of it).
    buffers = ReadBuffers(FETCH_CONCURRENCY + OPENING_RANGES, READ_BUFFER_BUDGET)

    async def fetch(
        pack_no: int,
        start: int,
        end: int,
        jobs: list[tuple[int, int]],
        ids: bytes,
        items: bytes,
        out: Buffer,
    ) -> None:
        """Read one range of a pack and open its chunks into the window's output."""
        async with buffers.take(end - start) as data:
            async with sem:
                await store.read_pack_range(pack_no, start, data)
            key = await store.pack_key(pack_no)
            # Open in slices so that every worker thread gets a share of a large range.
            await asyncio.gather(
                *(
                    loop.run_in_executor(
                        executor, codec.open_planned, key, data, start, ids, items, lo, hi, out
                    )
                    for lo, hi in jobs
                )
            )

    # A window's bytes start `lead` bytes into its buffer (which starts on a page), where
    # the window's first byte has the alignment of its offset in the stream.
    align = codec.window_align

    async def fetch_window(records: bytes, at: int) -> tuple[Window, int]:
        """The window of `records` that starts at offset `at` of the stream, and where the
        next one starts."""
        # One native pass: every chunk located, the distinct ones grouped into ranges
        # by pack and offset, each with its place in the window (csrc/windowplan.h).
        lead = at % align if align else 0
        status, bad, plan = index.plan_window(records, COALESCE_GAP, MAX_RANGE, DECODE_BATCH, lead)
        if plan is None:
            chunk_id, length = CHUNK_RECORD.unpack_from(records, bad * CHUNK_RECORD.size)
            if status == PLAN_LENGTH:
                raise IntegrityError(
                    f"chunk {chunk_id.hex()[:16]} of generation {gen_id} is {length} bytes in "
                    "its chunk table but not in the index",
                    hint="the manifest or an index object is damaged; run 'dedupe verify'",
                )
            damaged = sorted(store.damaged_index_objects)
            raise MissingObject(
                f"chunk {chunk_id.hex()[:16]} of generation {gen_id} is in no index object",
                hint=f"index object(s) {', '.join(damaged)} are damaged; run 'dedupe verify'"
                if damaged
                else "the repository lost data; run 'dedupe verify' to see what is affected",
            )
        total, ids, items, copies, ranges = plan
        out = codec.window_buffer(total)
        await asyncio.gather(
            *(fetch(pack_no, s, e, jobs, ids, items, out) for pack_no, s, e, jobs in ranges)
        )
        if copies:  # up to a window of memcpy (zero pages): off the event loop
            await loop.run_in_executor(executor, codec.copy_repeats, out, copies)
        view = memoryview(out).toreadonly()
        window = Window(len(records) // CHUNK_RECORD.size, align)
        if per_chunk:
            pos = lead
            for _chunk_id, length in CHUNK_RECORD.iter_unpack(records):
                window.append(view[pos : pos + length])
                pos += length
        else:
            window.append(view[lead:total])
        return window, at + total - lead

    queue: asyncio.Queue[Window | BaseException | None] = asyncio.Queue(WINDOWS_AHEAD)

    async def produce() -> None:
        try:
            at = 0
            for records in _windows(table):
                window, at = await fetch_window(records, at)
                await queue.put(window)
            await queue.put(None)
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put(e)

    digest = store.hasher.stream_digest()
    # The digest of a window is computed while the caller writes it (both only read its
    # bytes); updates stay in stream order, each starting once the previous one is done.
    updating: asyncio.Future[None] | None = None
    producer = asyncio.create_task(produce())
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            if digest_hex is not None:
                if updating is not None:
                    await updating
                updating = loop.run_in_executor(executor, digest.update_many, item)
            yield item
        if updating is not None:
            await updating
            updating = None
        if digest_hex is not None:
            _check_digest(digest, digest_hex, gen_id)
    finally:
        producer.cancel()
        try:
            await producer
        except asyncio.CancelledError:
            pass
        if updating is not None:  # never leave a thread reading buffers we drop
            await asyncio.wait([updating])
        release_buffers()
        close = getattr(table, "close", None)
        if close is not None:
            close()


def _check_digest(digest: StreamDigest, expected: str, gen_id: str) -> None:
    if digest.hexdigest() != expected:
        raise IntegrityError(
            f"the restored stream of generation {gen_id} does not match the digest recorded "
            "at backup",
        )


async def finish_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run fn on a thread; if we are cancelled meanwhile, wait for the thread to finish
    before re-raising. Cancelling only stops the *wait*: a write still running when the
    caller closes its descriptor would land in whatever file reuses the number."""
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await asyncio.wait([job])
        raise


async def write_to_path(
    stream: AsyncIterator[list[Buffer]],
    path: str,
    overwrite: bool = False,
    mode: int | None = None,
    mtime_ns: int | None = None,
) -> int:
    """Write to a temporary file beside `path`, fsync, and rename it into place only after
    the whole stream was verified: a failed restore never leaves a plausible-looking file.
    `mode` (permission bits) and `mtime_ns`, when given, are set on it before the rename.
    Errors name `path`, never the temporary file."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise TargetError(f"{path} is a directory; give a file name to restore into")
    if os.path.exists(path) and not overwrite:
        raise TargetError(f"{path} exists; remove it or choose another target")
    tmp = os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.dedupe-{secrets.token_hex(4)}"
    )
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise TargetError(f"cannot create {path}: {e.strerror}") from None
    written = 0
    try:
        out: OutputFile | None = None
        try:
            out = OutputFile(fd)
            async for parts in stream:
                align = parts.align if isinstance(parts, Window) else 0
                written += await finish_in_thread(out.write, parts, align)
            await finish_in_thread(out.finish)
        finally:
            if out is not None:
                out.close()
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode & 0o777)
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise TargetError(f"writing {path} failed: {e.strerror}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return written


def _descriptor(f: BinaryIO) -> int | None:
    """The descriptor behind a plain binary file (stdout, an open file, a pipe), to write
    to directly once f is flushed; None for any other file object."""
    if type(f) not in (io.FileIO, io.BufferedWriter):
        return None
    try:
        return f.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


async def write_to_fileobj(stream: AsyncIterator[list[Buffer]], f: BinaryIO) -> int:
    fd = _descriptor(f)

    def write(parts: list[Buffer]) -> int:
        if fd is not None:  # a window's parts in a few writev calls, not one write each
            return writev_all(fd, parts)
        n = 0
        for part in parts:
            f.write(part)
            n += len(part)
        return n

    written = 0
    try:
        if fd is not None:
            await finish_in_thread(f.flush)  # what f buffered goes first
        async for parts in stream:
            written += await finish_in_thread(write, parts)
        await finish_in_thread(f.flush)
    except BrokenPipeError:
        raise ReaderGone("the reader of the restored stream went away (broken pipe)") from None
    except OSError as e:
        raise TargetError(f"writing the restored stream failed: {e.strerror or e}") from None
    return written
