"""The restore pipeline.

The generation's chunk table, read piece by piece (from a file: it is never held whole),
is cut into windows of about WINDOW_BYTES of output. For each
window the chunks are grouped by pack, neighbouring blobs are read with one ranged get
(gaps under COALESCE_GAP are read through), ranges are fetched concurrently, and each
range is opened on the executor: AEAD under the chunk id, decompression, keyed BLAKE3
against the id. Only then are the window's bytes handed out, in stream order, while the
next window is being fetched. The whole-stream digest is checked at the end; a chunk that
fails any check raises before a byte of it is handed out.
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
from dedupe.store.readbuffers import ReadBuffers

T = TypeVar("T")

WINDOW_BYTES = 16 * 1024 * 1024
COALESCE_GAP = 256 * 1024
MAX_RANGE = 8 * 1024 * 1024
FETCH_CONCURRENCY = 4
OPENING_RANGES = 2  # ranges read and waiting to be opened, beside those being read
DECODE_BATCH = 1024 * 1024  # stored bytes opened per executor job
WINDOWS_AHEAD = 2

# (chunk id, offset in pack, stored length, raw length)
_Item = tuple[bytes, int, int, int]


def _windows(table: Iterable[Buffer]) -> Iterator[list[tuple[bytes, int]]]:
    window: list[tuple[bytes, int]] = []
    size = 0
    for piece in table:
        for chunk_id, length in CHUNK_RECORD.iter_unpack(piece):
            window.append((chunk_id, length))
            size += length
            if size >= WINDOW_BYTES:
                yield window
                window, size = [], 0
    if window:
        yield window


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


def _ranges(items: list[_Item]) -> Iterator[tuple[int, int, list[_Item]]]:
    """Coalesce blobs of one pack into (start, end, items) ranges, sorted by offset."""
    items.sort(key=lambda it: it[1])
    start = end = -1
    group: list[_Item] = []
    for it in items:
        _, offset, stored, _ = it
        if group and (offset - end > COALESCE_GAP or offset + stored - start > MAX_RANGE):
            yield start, end, group
            group = []
        if not group:
            start = offset
        group.append(it)
        end = max(end, offset + stored)
    if group:
        yield start, end, group


class Window(list[Buffer]):
    """A window's verified bytes in stream order. With `per_chunk`, one buffer per chunk;
    otherwise chunks that lie side by side in memory (neighbours in a pack, opened
    together) are one buffer: for 4 KiB pages, a digest update or an iovec per few hundred
    KiB instead of per 4 KiB (the blake3 package holds the GIL on small updates).
    `chunks` counts the chunks either way."""

    __slots__ = ("chunks",)

    def __init__(self, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks


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
    buffers = ReadBuffers(FETCH_CONCURRENCY + OPENING_RANGES)

    # Where an opened chunk is: (the buffer it was opened into, start, end).
    Opened = tuple[memoryview, int, int]

    def open_range(key: bytes, data: Buffer, start: int, items: list[_Item]) -> dict[bytes, Opened]:
        joined, ends = codec.open_joined(key, data, start, items)
        return {
            item[0]: (joined, s, e) for item, s, e in zip(items, [0, *ends], ends, strict=False)
        }

    async def fetch(pack_no: int, start: int, end: int, items: list[_Item]) -> dict[bytes, Opened]:
        async with buffers.take(end - start) as data:
            async with sem:
                await store.read_pack_range(pack_no, start, data)
            key = await store.pack_key(pack_no)
            # Open in slices so that every worker thread gets a share of a large range.
            jobs = [
                loop.run_in_executor(executor, open_range, key, data, start, part)
                for part in split_by_bytes(items, DECODE_BATCH)
            ]
            found: dict[bytes, Opened] = {}
            for part_found in await asyncio.gather(*jobs):
                found.update(part_found)
            return found

    async def fetch_window(window: list[tuple[bytes, int]]) -> Window:
        by_pack: dict[int, dict[bytes, _Item]] = {}
        for chunk_id, _length in window:
            loc = index.get(chunk_id)
            if loc is None:
                damaged = sorted(store.damaged_index_objects)
                raise MissingObject(
                    f"chunk {chunk_id.hex()[:16]} of generation {gen_id} is in no index object",
                    hint=f"index object(s) {', '.join(damaged)} are damaged; run 'dedupe verify'"
                    if damaged
                    else "the repository lost data; run 'dedupe verify' to see what is affected",
                )
            by_pack.setdefault(loc.pack_no, {})[chunk_id] = (
                chunk_id,
                loc.offset,
                loc.stored_length,
                loc.raw_length,
            )
        jobs = [
            fetch(pack_no, start, end, group)
            for pack_no, items in by_pack.items()
            for start, end, group in _ranges(list(items.values()))
        ]
        found: dict[bytes, Opened] = {}
        for part in await asyncio.gather(*jobs):
            found.update(part)
        out = Window(len(window))
        if per_chunk:
            for chunk_id, _ in window:
                buf, s, e = found[chunk_id]
                out.append(buf[s:e])
            return out
        run_buf: memoryview | None = None
        run_start = run_end = 0
        for chunk_id, _ in window:
            buf, s, e = found[chunk_id]
            if buf is run_buf and s == run_end:
                run_end = e
                continue
            if run_buf is not None:
                out.append(run_buf[run_start:run_end])
            run_buf, run_start, run_end = buf, s, e
        if run_buf is not None:
            out.append(run_buf[run_start:run_end])
        return out

    queue: asyncio.Queue[Window | BaseException | None] = asyncio.Queue(WINDOWS_AHEAD)

    async def produce() -> None:
        try:
            for window in _windows(table):
                await queue.put(await fetch_window(window))
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
                written += await finish_in_thread(out.write, parts)
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
