"""The backup pipeline.

    source ─▶ [read] ─q─▶ [chunk + id, digest] ─q─▶ [dedupe] ─q─▶ [seal into packs] ─q─▶ [write]
                            (executor, 2 jobs)       (loop)    compress jobs in flight   (backend)
                                                                 on the executor

- Every queue is bounded, so memory is bounded by the queue depths times the read size and
  the pack size, never by the size of the source.
- CPU work runs on the executor in batches of one read block (~4 MiB): the C chunker,
  BLAKE3, zstd and libsodium all release the GIL, so the cores work in parallel.
- One task (dedupe) owns the lookup: it consults the repository index and the set of
  chunks this backup has already queued, and it alone appends to the chunk table. A
  stream full hands the table straight to its manifest writer, which seals and spills it
  frame by frame (dedupe.store.manifests), so the table is never held whole.
- Packs are written before the key map and the index object that list them, and those
  before the manifest, the commit point (docs/FORMAT.md section 9). A large backup writes
  an index object (after its key map) every INDEX_FLUSH_ENTRIES new chunks; the last
  packs are indexed at the commit, in one key map with the manifest. Cancelling at any
  moment leaves only unreferenced packs and chunks behind (prune removes them); the
  repository stays valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import operator
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import compress
from typing import Any, Protocol, TypeVar

from dedupe._types import BackupStats, Progress, ProgressCallback
from dedupe.chunking import (
    AUTO,
    SNIFF_BYTES,
    Block,
    MapReader,
    StreamChunker,
    make_chunker,
    parse_spec,
    sniff,
)
from dedupe.engine.stages import run_stages
from dedupe.errors import EmptySource, SourceError
from dedupe.format.delta import DeltaBuilder
from dedupe.format.index import ENTRY_RECORD
from dedupe.format.manifest import CHUNK_RECORD, RawJSON
from dedupe.store import FinishedPack, PackWriter, RepositoryStore
from dedupe.store.blobs import Dictionary, FramedBatch, release_buffers
from dedupe.store.dictionaries import PageSampler
from dedupe.store.dictionaries import enabled as dictionaries_enabled
from dedupe.store.dictionaries import train as train_dictionary
from dedupe.store.index import chunk_records
from dedupe.store.manifests import Buffer, ManifestWriter, scratch_error
from dedupe.store.repository import BeforeWrite, IndexBatch, utc_now
from dedupe.store.tables import SpilledTable

T = TypeVar("T")
FASTCDC = "fastcdc"

# Blocks read ahead of the chunker. One: a mapped window costs nothing to read, and each
# one waiting is 2 MiB resident at a backup's peak (stop 37).
BLOCK_QUEUE = 1
# Batches whose ids are being hashed while the chunker moves on: keeps both cores busy.
HASHED_QUEUE = 3
# Compress jobs in flight: enough to keep every core busy while one batch is sealed.
FRAMING_IN_FLIGHT = (os.cpu_count() or 2) + 1
PACK_QUEUE = 1
# New chunks listed per index object. A backup writes one each time this many new chunks
# are in written packs (and one at the end): what it holds for chunks it has stored is
# then bounded (~100 bytes each, so ~1.5 MiB), whatever the size of the snapshot; the
# rest is in the repository's native index, at most 56 bytes per chunk. 16,384 rather
# than 32,768 since stop 37: the flush lands at the peak of a backup's memory, and an
# index object of 0.6 MB is still few objects (64 for a 4 GiB page database).
INDEX_FLUSH_ENTRIES = 16384

log = logging.getLogger("dedupe")


class FileEnd:
    """Item in a backup's input: the current file ends here. The chunker cuts here (a
    chunk never spans two files) and the file's digest is recorded (Ingested.marks)."""

    __slots__ = ()


@dataclass(frozen=True)
class Reuse:
    """Item in a backup's input: chunk records (CHUNK_RECORDs) copied from a parent for
    content that was not read again (an unchanged file of an incremental)."""

    records: bytes
    size: int  # logical bytes they stand for


FILE_END = FileEnd()
Item = bytes | Block | FileEnd | Reuse


class TableSink(Protocol):
    """Where a backup's chunk table goes as it is produced (a ManifestWriter)."""

    def add(self, records: Buffer) -> None: ...


class _DeltaSink:
    """An incremental's table: records go through the delta against the parent's, and
    only those the parent lacks (the literal table) reach the manifest."""

    def __init__(self, builder: DeltaBuilder, body: ManifestWriter) -> None:
        self._builder, self._body = builder, body

    def add(self, records: Buffer) -> None:
        try:
            literal = self._builder.feed(records)
        except OSError as e:
            raise scratch_error(e, "reading", "the parent table's") from None
        if literal:
            self._body.add(literal)


@dataclass
class Ingested:
    """What the pipeline produced: the chunk table in input order (empty when it went to
    a manifest writer), the marks at each FileEnd (records so far, digest of that file's
    bytes read), the digest of everything read since the last mark, what it added to
    the repository, and the packs it wrote that no index object lists yet (`pending`:
    the commit indexes them). `progress.chunks` counts the table's records."""

    table: bytearray
    marks: list[tuple[int, str]]
    digest: str
    progress: Progress
    packs: int
    seconds: float
    chunkers: list[dict[str, Any]]  # strategies used, in order of first use
    pending: IndexBatch
    # The compression dictionary of its pages (used or trained), for the header.
    dictionary: str | None = None


async def ingest(
    store: RepositoryStore,
    items: AsyncIterator[Item],
    *,
    executor: Executor,
    progress: ProgressCallback | None = None,
    size_hint: int | None = None,
    chunker: dict[str, Any] | str = FASTCDC,
    table_out: TableSink | None = None,
    before_salvage: Callable[[], Awaitable[None]] | None = None,
    dry_run: bool = False,
    dictionary: str | None = None,
) -> Ingested:
    """Run the pipeline over `items` and store every new chunk. The packs written since
    the last index object are returned unindexed (`Ingested.pending`) and no manifest is
    written: the caller commits both. The chunk table goes to `table_out` when given,
    else into `Ingested.table`.

    If the pipeline fails or is cancelled (Ctrl-C, SIGTERM) and `before_salvage` is given,
    the packs written since the last index object are indexed before the error goes on,
    once `before_salvage` (the lock's confirm) has not refused: no generation refers to
    them, but the next backup finds their chunks and does not store them again (a resumed
    backup costs what it had not yet stored). Prune removes them if none ever does.

    `dry_run`: chunk, hash and look up everything, count what would be new, store nothing.

    `chunker` is a strategy spec (dedupe.chunking.strategy), "fastcdc" (the repository's
    parameters) or "auto", which picks one per
    file from its first block (a SQLite database: fixed blocks of its page size).

    Pages (chunks of a fixed-size strategy) are compressed with a dictionary (FORMAT.md
    16): `dictionary`, the id an earlier generation's header names, when this key can
    open it; else one trained on this backup's first new pages, which are compressed
    without one until it is ready."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()

    def run(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return loop.run_in_executor(executor, fn, *args)

    await store.refresh_index()  # see what concurrent backups stored meanwhile
    index = store.index
    hasher = store.hasher
    codec = store.codec
    params, gear = store.chunker_params, store.gear
    if chunker == FASTCDC:
        chunker = parse_spec(FASTCDC, params)
    current: StreamChunker | None = None  # the chunker of the file being read
    specs: list[dict[str, Any]] = []  # strategies used, in order of first use
    digest = hasher.stream_digest()
    packer = PackWriter(store.pack_size)
    pages = _PageDictionary(store, run)
    if not dry_run:
        await pages.start(dictionary)

    table = bytearray()  # CHUNK_RECORD after CHUNK_RECORD, in input order
    add_records = table.extend if table_out is None else table_out.add
    marks: list[tuple[int, str]] = []
    # New chunk ids this backup has sent to be stored and no index object lists yet.
    queued: set[bytes] = set()
    # Packs written since the last index object, their entries and their key map entries.
    batch = IndexBatch()
    packs_written = 0
    p = Progress("backup", "reading", bytes_total=size_hint)

    # Between the chunk and dedupe stages: chunks with their ids (being hashed) and whether
    # they are pages, the digest of a file that ended (being finalised), or reused records.
    Hashed = tuple[list[memoryview], Awaitable[list[bytes]], bool] | Awaitable[str] | Reuse
    blocks_q: asyncio.Queue[Item | None] = asyncio.Queue(BLOCK_QUEUE)
    hashed_q: asyncio.Queue[Hashed | None] = asyncio.Queue(HASHED_QUEUE)
    framed_q: asyncio.Queue[Awaitable[FramedBatch] | None] = asyncio.Queue(FRAMING_IN_FLIGHT)
    packs_q: asyncio.Queue[FinishedPack | None] = asyncio.Queue(PACK_QUEUE)

    # Readers of mapped windows (MapReader): a source file that shrank under one of them
    # read zeros in place of its lost bytes, so the backup must not commit.
    mappers: set[MapReader] = set()

    async def read_stage() -> None:
        async for item in items:
            if isinstance(item, bytes | Block):
                if not len(item):
                    continue
                p.bytes_read += len(item)
                if type(item) is Block and item.reader is not None:
                    mappers.add(item.reader)
            await blocks_q.put(item)
        await blocks_q.put(None)

    # The digest runs on a thread of its own, so that its updates stay in order while
    # chunking and id hashing of later blocks go on beside it on the shared executor.
    digest_thread = ThreadPoolExecutor(1, thread_name_prefix="dedupe-digest")

    def digest_job(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return loop.run_in_executor(digest_thread, fn, *args)

    paged = False  # whether the current chunker cuts pages

    async def cut(final: bool, block: bytes | Block | None = None) -> None:
        nonlocal current, paged
        if current is None:
            if block is None:
                return  # a file or stream with no bytes: no chunks
            first = bytes(memoryview(block)[:SNIFF_BYTES])
            spec = sniff(first, params) if chunker == AUTO else chunker
            assert isinstance(spec, dict)
            if spec not in specs:
                specs.append(spec)
            current = make_chunker(spec, params, gear)
            paged = spec.get("algorithm") == "fixed"
        chunks = await run(current.finish) if final else await run(current.feed, block)
        if final:
            current = None
        await hashed_q.put((chunks, run(hasher.chunk_ids, chunks), paged))

    async def chunk_stage() -> None:
        nonlocal digest
        updates: list[asyncio.Future[None]] = []
        while (item := await blocks_q.get()) is not None:
            if isinstance(item, FileEnd):
                await cut(final=True)
                await hashed_q.put(digest_job(digest.hexdigest))
                digest = hasher.stream_digest()
            elif isinstance(item, Reuse):
                await hashed_q.put(item)
            else:
                updates.append(digest_job(digest.update, item))
                await cut(final=False, block=item)
                # Collect finished updates (and raise their errors) as we go.
                while updates and updates[0].done():
                    updates.pop(0).result()
        await cut(final=True)
        await asyncio.gather(*updates)
        await hashed_q.put(None)

    async def dedupe_stage() -> None:
        # Per batch, not per chunk: the table records and the index lookup are one native
        # call each, and the chunks to store are picked by C-level set and list calls.
        while (item := await hashed_q.get()) is not None:
            if isinstance(item, Reuse):
                add_records(item.records)
                p.chunks += len(item.records) // CHUNK_RECORD.size
                continue
            if not isinstance(item, tuple):
                marks.append((p.chunks, await item))
                continue
            chunks, hashing, are_pages = item
            ids = await hashing
            add_records(chunk_records(ids, chunks))
            p.chunks += len(chunks)
            new_chunks, new_ids = _unstored(index.usable_many(b"".join(ids)), chunks, ids, queued)
            if new_chunks:
                p.chunks_new += len(new_chunks)
                p.bytes_new += sum(map(len, new_chunks))
                if not dry_run:
                    d = await pages.use(new_chunks) if are_pages else None
                    await framed_q.put(run(codec.frame, new_chunks, new_ids, d))
            if progress:
                progress(p)
        await framed_q.put(None)
        await pages.finish()

    async def hand_over(pack: FinishedPack) -> None:
        # A rendezvous: wait until the writer has taken the pack before sealing on. At most
        # two pack buffers (a pack's size each) are then held, the one being written and the one
        # being filled; with a queue between them, and the next pack started as soon as
        # one was complete, a store slower than sealing made it four.
        await packs_q.put(pack)
        await packs_q.join()

    async def seal_stage() -> None:
        while (framing := await framed_q.get()) is not None:
            framed = await framing
            while framed.pending:
                pack = await run(packer.fill, framed)
                if pack is not None:
                    await hand_over(pack)
        last = await run(packer.flush)
        if last is not None:
            await hand_over(last)
        await packs_q.put(None)

    async def write_index() -> None:
        nonlocal batch
        await store.write_batch(batch)
        # The index has them now: usable() answers for them from here on.
        queued.difference_update(cid for cid, *_ in ENTRY_RECORD.iter_unpack(batch.records))
        batch = IndexBatch()

    async def store_pack(pack: FinishedPack) -> None:
        nonlocal packs_written
        await store.write_finished_pack(pack, batch)
        packs_written += 1
        p.bytes_stored += len(pack.data)
        packer.recycle(pack)

    # The pack being written. Shielded from cancellation: a Ctrl-C that lands during a
    # write waits for it (below) so that the pack is salvaged with the others, rather
    # than landing on disk after the salvage as a pack no index lists.
    writing: asyncio.Future[None] | None = None

    async def write_stage() -> None:
        nonlocal writing
        while (pack := await packs_q.get()) is not None:
            packs_q.task_done()
            writing = asyncio.ensure_future(store_pack(pack))
            await asyncio.shield(writing)
            writing = None
            if len(batch.records) >= INDEX_FLUSH_ENTRIES * ENTRY_RECORD.size:
                await write_index()

    try:
        await run_stages(read_stage, chunk_stage, dedupe_stage, seal_stage, write_stage)
        final_digest = await digest_job(digest.hexdigest)
    except BaseException:
        if writing is not None:
            with contextlib.suppress(BaseException):  # its own failure is not this one
                await writing
        if before_salvage is not None and packs_written:
            await _salvage(store, batch, before_salvage, packs_written, p.bytes_stored)
        raise
    finally:
        pages.cancel()
        digest_thread.shutdown(wait=False, cancel_futures=True)
        release_buffers()
    if any(reader.torn for reader in mappers):
        # Every stage is done with the windows, so no later fault can go unnoticed. The
        # packs written hold correct chunks of what was read; no manifest refers to them.
        raise SourceError(
            "the source file shrank while it was being read (another process truncated "
            "it, or its storage failed to return some pages); nothing was committed. "
            "Back up a stable copy or a snapshot of it"
        )

    return Ingested(
        table,
        marks,
        final_digest,
        p,
        packs_written,
        time.monotonic() - started,
        specs,
        batch,
        pages.dictionary_id,
    )


class _PageDictionary:
    """The compression dictionary of a backup's pages (FORMAT.md 16): the one an earlier
    generation of the name used, if this key can open it; else one trained on samples of
    the first new pages, in the background, and stored (its key map entry first) before
    any blob uses it. Driven from the event loop by the dedupe stage."""

    def __init__(self, store: RepositoryStore, run: Callable[..., Awaitable[Any]]) -> None:
        self._store, self._run = store, run
        self.handle: Dictionary | None = None
        self.dictionary_id: str | None = None
        self._sampler: PageSampler | None = None
        self._training: asyncio.Task[None] | None = None

    async def start(self, dictionary_id: str | None) -> None:
        if not dictionaries_enabled():
            return
        if dictionary_id is not None:
            self.handle = await self._store.dictionary_by_id(dictionary_id)
        if self.handle is not None:
            self.dictionary_id = dictionary_id
        else:
            self._sampler = PageSampler()

    async def use(self, new_pages: list[memoryview]) -> Dictionary | None:
        """The dictionary to compress these new pages with. Until enough pages were
        sampled, None (the first pages go without); then the training runs while the
        framing of batches already sent goes on, and the next batch of pages waits for
        it (~0.1 s, once per name and key)."""
        sampler = self._sampler
        if sampler is not None and self._training is None:
            sampler.feed(new_pages)
            if sampler.full:
                self._training = asyncio.ensure_future(self._train())
            return None
        if self._training is not None and not self._training.done():
            await self._training
        return self.handle

    async def finish(self) -> None:
        """At the end of the backup: train on what was sampled if that is enough (the
        next backup of the name will use it), and wait for the training."""
        sampler = self._sampler
        if self._training is None and sampler is not None and not sampler.closed:
            if sampler.enough:
                self._training = asyncio.ensure_future(self._train())
        if self._training is not None:
            await self._training

    def cancel(self) -> None:
        """When the backup ends: stop a training still running; the error of one that
        failed is the backup's (or lost to the one that stopped it), not a warning."""
        training = self._training
        if training is None:
            return
        if not training.done():
            training.cancel()
        elif not training.cancelled():
            training.exception()

    async def _train(self) -> None:
        assert self._sampler is not None
        samples = self._sampler.take()
        data = await self._run(train_dictionary, samples, self._store.codec.level)
        if data is None:
            log.info("zstd made no dictionary of this backup's %d sampled pages", len(samples))
            return
        self.dictionary_id, self.handle = await self._store.write_dictionary(data)


def _unstored(
    usable: bytearray, chunks: list[memoryview], ids: list[bytes], queued: set[bytes]
) -> tuple[list[memoryview], list[bytes]]:
    """The chunks of a batch to store, with their ids, and add those ids to `queued`:
    each chunk the index cannot serve (`usable[i]` is 0) whose id is neither queued by an
    earlier batch nor earlier in this one. Per-chunk Python work was most of the cost of
    a backup cut into 4 KiB pages, so the common cases (all new, none new, no repeats)
    run in set and list calls; only a batch with repeats is walked chunk by chunk."""
    if usable.find(0) < 0:
        return [], []
    if usable.find(1) < 0:
        wanted_chunks, wanted_ids = chunks, ids
    else:
        keep = list(map(operator.not_, usable))
        wanted_chunks, wanted_ids = list(compress(chunks, keep)), list(compress(ids, keep))
    fresh = set(wanted_ids)
    if len(fresh) == len(wanted_ids) and queued.isdisjoint(fresh):
        queued |= fresh
        return wanted_chunks, wanted_ids
    new_chunks: list[memoryview] = []
    new_ids: list[bytes] = []
    for chunk, chunk_id in zip(wanted_chunks, wanted_ids, strict=True):
        if chunk_id not in queued:
            queued.add(chunk_id)
            new_chunks.append(chunk)
            new_ids.append(chunk_id)
    return new_chunks, new_ids


def dry_run_stats(got: Ingested, name: str, kind: str, parent: str | None) -> BackupStats:
    """What a backup would have done: read, chunks, new chunks and bytes. Its `id` is "":
    nothing was stored or committed."""
    p = got.progress
    return BackupStats(
        id="",
        name=name,
        kind=kind,
        bytes_read=p.bytes_read,
        bytes_new=p.bytes_new,
        bytes_stored=0,
        chunks=p.chunks,
        chunks_new=p.chunks_new,
        packs=0,
        seconds=got.seconds,
        parent=parent,
        chunker=got.chunkers[0] if len(got.chunkers) == 1 else got.chunkers,
    )


async def index_only(
    store: RepositoryStore,
    got: Ingested,
    name: str,
    kind: str,
    before_commit: Callable[[], Awaitable[None]] | None,
) -> BackupStats:
    """Index the packs a store-only backup wrote, and commit nothing. Its `id` is ""."""
    if before_commit is not None:
        await before_commit()
    if got.pending.packs:
        await store.write_batch(got.pending)
    return dataclasses.replace(
        dry_run_stats(got, name, kind, None),
        bytes_stored=got.progress.bytes_stored,
        packs=got.packs,
    )


async def _salvage(
    store: RepositoryStore,
    batch: IndexBatch,
    before_salvage: Callable[[], Awaitable[None]],
    packs: int,
    stored: int,
) -> None:
    """Index what a failed backup wrote (see ingest), and say so on the "dedupe" logger.
    Never raises: the error that stopped the backup is the one to report."""
    try:
        await before_salvage()
        if batch.packs:
            await store.write_batch(batch)
    except Exception as e:  # noqa: BLE001 - reported, and the original error goes on
        log.warning(
            "no generation was committed; the %d packs this backup wrote are not indexed "
            "(%s): prune removes them",
            packs,
            getattr(e, "message", e),
        )
        return
    log.warning(
        "no generation was committed; the %d packs (%.1f MiB) this backup stored are kept "
        "and indexed: the next backup of the source reuses them",
        packs,
        stored / 2**20,
    )


async def commit(
    store: RepositoryStore,
    got: Ingested,
    *,
    name: str,
    kind: str,
    parent: str | None,
    source_info: dict[str, Any],
    meta: dict[str, Any],
    body: ManifestWriter,
    chunk_count: int,
    size: int,
    progress: ProgressCallback | None = None,
    before_commit: Callable[[], Awaitable[None]] | None = None,
    labels: dict[str, Any] | None = None,
    before_write: BeforeWrite | None = None,
) -> BackupStats:
    """Write the last index object and the manifest, the commit point of a backup, after
    the key map that authenticates both. `labels` (host, tags) go into the header as they
    are. `meta` and the records `body` holds are its body
    (docs/FORMAT.md section 8); `chunk_count` counts the records of the generation's
    complete table and `size` its logical size. `before_commit` runs right before the
    header is made and may raise to refuse the commit (the caller's lock was lost, so a
    prune may have removed chunks this generation references); it may still change
    `labels`. `before_write(gen_id, header)` runs once the id is known, before anything
    is written, and may raise to refuse the commit too (a sync replica failed)."""
    p = got.progress
    p.stage = "committing"
    if progress:
        progress(p)
    if before_commit is not None:
        await before_commit()
    header = {
        "version": 1,
        "name": name,
        "kind": kind,
        "parent": parent,
        "created": utc_now(),
        "source": source_info,
        "chunker": got.chunkers[0] if len(got.chunkers) == 1 else got.chunkers,
        "size": size,
        "chunks": chunk_count,
        "new_chunks": p.chunks_new,
        "new_bytes": p.bytes_new,
        "stored_bytes": p.bytes_stored,
        "seconds": round(got.seconds, 6),
        **({"dictionary": got.dictionary} if got.dictionary else {}),
        **(labels or {}),
    }
    gen_id = await store.commit_manifest(body, header, meta, got.pending, before_write)
    p.stage = "done"
    if progress:
        progress(p)
    return BackupStats(
        id=gen_id,
        name=name,
        kind=kind,
        bytes_read=p.bytes_read,
        bytes_new=p.bytes_new,
        bytes_stored=p.bytes_stored,
        chunks=chunk_count,
        chunks_new=p.chunks_new,
        packs=got.packs,
        seconds=got.seconds,
        parent=parent,
        chunker=header["chunker"],
    )


def empty_source(message: str, looks_like: str) -> EmptySource:
    return EmptySource(
        f"{message}; nothing was committed",
        hint=f"{looks_like} looks like this; to store an empty generation on purpose, "
        "pass --allow-empty",
    )


async def run_backup(
    store: RepositoryStore,
    blocks: AsyncIterator[bytes | Block],
    *,
    name: str,
    source_info: dict[str, Any],
    executor: Executor,
    progress: ProgressCallback | None = None,
    size_hint: int | None = None,
    kind: str = "full",
    parent: tuple[str, SpilledTable] | None = None,
    before_commit: Callable[[], Awaitable[None]] | None = None,
    chunker: dict[str, Any] | str = FASTCDC,
    allow_empty: bool = False,
    labels: dict[str, Any] | None = None,
    dry_run: bool = False,
    before_write: BeforeWrite | None = None,
    store_only: bool = False,
    dictionary: str | None = None,
) -> BackupStats:
    """Back up one stream as a generation of `name`. `parent` is (generation id, its
    complete chunk table in a file, from dedupe.store.tables.spill_complete_table) for
    an incremental or differential: the manifest then stores only the delta against that
    table (dedupe.format.delta). A stream of no bytes raises EmptySource unless
    `allow_empty`. `store_only`: store and index the chunks the repository has no usable
    copy of, and commit no generation (a repair from a replica)."""
    if (kind == "full") != (parent is None):
        raise ValueError("a full has no parent; an incremental or differential needs one")
    loop = asyncio.get_running_loop()
    with store.manifest_writer() as body:
        # The table goes to the manifest as it is produced: a full's as it is, an
        # incremental's through the delta against its parent's, which is read from its
        # file, so neither table is held whole.
        table_out: TableSink = body
        builder = None
        if parent is not None:
            parent_id, parent_table = parent
            try:
                builder = await loop.run_in_executor(
                    executor,
                    lambda: DeltaBuilder(
                        fd=parent_table.file.fileno(), n_parent=parent_table.records
                    ),
                )
            except OSError as e:
                raise scratch_error(e, "reading", "the parent table's") from None
            table_out = _DeltaSink(builder, body)
        got = await ingest(
            store,
            blocks,
            executor=executor,
            progress=progress,
            size_hint=size_hint,
            chunker=chunker,
            table_out=table_out,
            before_salvage=before_commit,
            dry_run=dry_run,
            dictionary=dictionary,
        )
        if dry_run:
            return dry_run_stats(got, name, kind, parent[0] if parent else None)
        if store_only:
            return await index_only(store, got, name, kind, before_commit)
        if got.progress.bytes_read == 0 and not allow_empty:
            raise empty_source(
                f"{source_info.get('label') or 'the source'} gave no bytes",
                "a command that failed in a pipe (run the pipeline under `set -o pipefail`)",
            )
        meta: dict[str, Any] = {"type": "stream", "digest": got.digest}
        if builder is not None:
            meta["delta"] = {"parent": parent_id, "ops": RawJSON(builder.ops_json())}
        meta["chunk_count"] = body.records
        return await commit(
            store,
            got,
            name=name,
            kind=kind,
            parent=parent[0] if parent else None,
            source_info=source_info,
            meta=meta,
            body=body,
            chunk_count=got.progress.chunks,
            size=got.progress.bytes_read,
            progress=progress,
            before_commit=before_commit,
            labels=labels,
            before_write=before_write,
        )
