"""Prune: remove the data that no generation references any more.

Under the exclusive repository lock (no backup runs meanwhile, so no chunk can become
referenced while we decide), prune:

1. reads every index object and lists `packs/`; a chunk is *live* when some generation's
   complete chunk table (`generation_chunks`, chains expanded) names it;
2. picks one copy of each live chunk (among packs that exist; preferring the pack with
   the largest live fraction, so that a re-run after a crash settles on the copies the
   interrupted run had just written), and classifies every pack:
   - *unused*: no chosen copy in it -> delete;
   - *sparse*: unused fraction of its bytes above `repack_threshold` -> repack: its live
     blobs are read (ranged reads), opened and checked, re-framed and sealed into new
     packs under fresh keys;
   - *unindexed*: in `packs/` but in no index object (left by an interrupted backup or
     prune) -> delete;
   - otherwise kept as it is;
3. writes, in this order:
   a. the new packs (repacked blobs);
   b. ONE new index object listing every chunk of the kept packs and the new packs;
   c. then deletes every index object it read;
   d. then deletes the unused, repacked and unindexed packs;
   e. then deletes quarantine records (verify's list of damaged copies) whose packs are
      all gone. Quarantined copies are never chosen as a chunk's copy, so a pack holding
      only damaged copies of live chunks counts as unused;
   f. then removes what interrupted writers left, or someone planted: manifests no key map
      vouches for, key files the keyring does not list (an interrupted `key add`),
      temporary files of killed puts, a stale keyring copy;
   g. then consolidates the key maps (docs/FORMAT.md 4.6): one set of admin-signed key
      maps holding the entries of the objects that remain; only then the old ones go.

Index objects that are not authenticated (no key map entry: planted, or left by a key
holder since removed) are not trusted: their packs count as unindexed, and they are
deleted with the others in (c).

Why the order is crash-safe (the invariant: at every instant every chunk that some
generation references is listed by an index object whose pack exists):
- before (b) completes, all old index objects and all old packs are untouched; the new
  packs are merely unindexed data;
- after (b), the new index object alone covers every live chunk, in packs that exist (kept
  packs are not deleted, new packs were written in (a)); deleting old index objects (c)
  therefore loses nothing, in any order and at any point;
- (d) starts only after (c) finished, so no remaining index object lists a deleted pack.
  The only index object left lists none of the deleted packs.
A prune killed at any point leaves a valid repository, in which every generation restores;
what it leaves behind (new packs not yet indexed, an extra index object, packs not yet
deleted) is ordinary unreferenced data or a duplicate listing, which the next prune
cleans up. Manifests are never touched here (forget deletes them).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from dedupe._types import Progress, ProgressCallback
from dedupe.backends.base import Backend
from dedupe.crypto import OVERHEAD
from dedupe.errors import MissingObject
from dedupe.format.index import ENTRY_RECORD, PackRecord
from dedupe.format.keymap import GENERATION, INDEX, PACK, QUARANTINE
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.format.pack import FOOTER_SIZE, PACK_MAGIC
from dedupe.store import PackWriter, RepositoryStore
from dedupe.store.blobs import FramedBatch, release_buffers
from dedupe.store.locks import RepositoryLock
from dedupe.store.quarantine import QUARANTINE_PREFIX, decode_quarantine, read_quarantine
from dedupe.store.repository import KEYS_PREFIX, IndexBatch, key_id_of, named_ids, pack_name
from dedupe.store.tables import each_generation_table

T = TypeVar("T")

COALESCE_GAP = 256 * 1024  # read through gaps between live blobs smaller than this
MAX_RANGE = 8 * 1024 * 1024
READ_CONCURRENCY = 4
DELETE_CONCURRENCY = 8
REENCRYPT_FLUSH = 256  # new packs per index object while re-encrypting (~4 GiB)
TRAILER_ENTRY = 44  # docs/FORMAT.md section 6


def pack_overhead(blobs: int) -> int:
    """Bytes of a pack that are not blobs: magic, sealed trailer (count + one entry per
    blob + AEAD overhead) and footer. Never counted as unused space."""
    return len(PACK_MAGIC) + 4 + TRAILER_ENTRY * blobs + OVERHEAD + FOOTER_SIZE


@dataclass(frozen=True)
class PruneReport:
    """What prune did (or, with `dry_run`, would do). Byte counts are pack bytes in the
    backend: `bytes_freed` = bytes of deleted packs - bytes of packs written."""

    dry_run: bool
    generations: int
    packs_before: int
    packs_deleted: int  # packs with no live chunk (and unindexed leftovers)
    packs_repacked: int  # sparse packs whose live blobs were rewritten
    packs_written: int  # new packs holding the repacked blobs
    packs_after: int
    bytes_before: int
    bytes_after: int
    bytes_freed: int
    bytes_repacked: int  # stored bytes of live blobs moved into new packs
    chunks_live: int
    chunks_removed: int  # chunk ids no longer listed by any index object
    index_objects_removed: int
    index_objects_written: int
    unindexed_packs: int  # part of packs_deleted
    seconds: float
    removed_packs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Copy:
    pack_id: bytes
    offset: int
    stored: int
    raw: int


async def _gather_limited(jobs: list[Awaitable[T]], limit: int) -> list[T]:
    sem = asyncio.Semaphore(limit)

    async def one(job: Awaitable[T]) -> T:
        async with sem:
            return await job

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def reload_index(store: RepositoryStore) -> None:
    """Forget the in-memory index and load it again from the index objects now present
    (pack numbers change when index objects are replaced, so nothing cached survives)."""
    await store.refresh_index(rebuild=True)


async def run_prune(
    store: RepositoryStore,
    *,
    executor: Executor | None = None,
    repack_threshold: float = 0.5,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    lock: bool = True,
    reencrypt_below: int | None = None,
) -> PruneReport:
    """Delete unreferenced packs, repack sparse ones, replace all index objects by one.

    `reencrypt_below` (`key rotate --reencrypt`, docs/FORMAT.md 10.2): every pack whose
    data key was made in an epoch below it is repacked as well, whatever its waste, and a
    copy in any other pack is preferred; the new packs are indexed every REENCRYPT_FLUSH
    packs, so that a run killed half way leaves what it rewrote for the next one.

    `repack_threshold` in [0, 1]: a pack whose unused fraction (bytes of blobs no
    generation needs, over the pack's length; the pack's own trailer and footer do not
    count) exceeds it is repacked (0.0: any waste; 1.0: never, only wholly unused packs
    are deleted). With `dry_run` nothing is
    written or deleted and the report says what would be. Takes the exclusive lock unless
    `lock=False` (for a caller that already holds it). Raises MissingObject, refusing to
    change anything, if a live chunk has no copy in an existing pack."""
    if not 0.0 <= repack_threshold <= 1.0:
        raise ValueError("repack_threshold must be within 0..1")
    if not lock:
        return await _prune(store, executor, repack_threshold, dry_run, progress, reencrypt_below)
    async with RepositoryLock(store.backend, exclusive=True, operation="prune") as held:
        report = await _prune(store, executor, repack_threshold, dry_run, progress, reencrypt_below)
        held.check()
        return report


def stale_key_packs(store: RepositoryStore, pack_ids: Iterable[bytes], below: int) -> set[bytes]:
    """The packs among `pack_ids` whose data key was made in an epoch below `below`."""
    stale = set()
    for pid in pack_ids:
        found = store.keymaps.get(PACK, pid)
        if found is not None and found.entry.born < below:
            stale.add(pid)
    return stale


async def _prune(
    store: RepositoryStore,
    executor: Executor | None,
    threshold: float,
    dry_run: bool,
    progress: ProgressCallback | None,
    reencrypt_below: int | None = None,
) -> PruneReport:
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    backend = store.backend
    p = Progress("prune", "scanning")

    def report_progress(stage: str) -> None:
        p.stage = stage
        if progress:
            progress(p)

    def run(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return loop.run_in_executor(executor, fn, *args)

    report_progress("scanning")
    # --- 1. what exists, what is referenced ----------------------------------------------------
    index_names = sorted(named_ids(await backend.list("index/")).values())
    present = set(named_ids(await backend.list("packs/")))
    await store.refresh_keys()  # after listing: every listed index object's key map is in
    trusted = [n for n in index_names if store.keymaps.get(INDEX, _oid(n)) is not None]

    async def load(name: str) -> tuple[list[PackRecord], list[tuple[bytes, int, int, int, int]]]:
        data = await backend.get(name)
        return await store.decode_index_object(name, data)

    loaded = await _gather_limited([load(n) for n in trusted], READ_CONCURRENCY)
    # Copies verify found damaged or missing (docs/FORMAT.md section 13) are no copies.
    quarantined = await read_quarantine(backend, store.quarantine_key)

    # A manifest no key map vouches for is no generation (its key map would have been
    # written first): planted, or left by a key since removed. It holds nothing live, and
    # goes with the other leftovers (3f). One that is authenticated but fails to expand
    # stops prune: a chunk it references might otherwise be deleted.
    gen_ids, planted = [], []
    for gen_id in await store.generation_ids():
        if store.keymaps.get(GENERATION, bytes.fromhex(gen_id)) is None:
            planted.append(f"generations/{gen_id}")
        else:
            gen_ids.append(gen_id)
    live: set[bytes] = set()
    async for _gen_id, got in each_generation_table(store, gen_ids):
        if isinstance(got, Exception):
            raise got  # a chunk it references might be deleted: prune nothing
        live.update(cid for cid, _len in CHUNK_RECORD.iter_unpack(got[1]))

    # --- 2. choose one copy per chunk, classify packs ------------------------------------------
    records: dict[bytes, PackRecord] = {}
    copies: dict[bytes, list[_Copy]] = defaultdict(list)
    indexed_chunks: set[bytes] = set()
    listed: set[tuple[bytes, bytes]] = set()  # (pack id, chunk id) pairs, for the overhead
    for packs, entries in loaded:
        for rec in packs:
            records.setdefault(rec.pack_id, rec)
        for chunk_id, pack_no, offset, stored, raw in entries:
            indexed_chunks.add(chunk_id)
            pack_id = packs[pack_no].pack_id
            listed.add((pack_id, chunk_id))
            if pack_id in present and (chunk_id, pack_id) not in quarantined:
                copies[chunk_id].append(_Copy(pack_id, offset, stored, raw))

    live_in_pack: dict[bytes, int] = defaultdict(int)  # all live copies, for the preference
    for chunk_id in live:
        seen: set[bytes] = set()
        for c in copies.get(chunk_id, ()):
            if c.pack_id not in seen:
                seen.add(c.pack_id)
                live_in_pack[c.pack_id] += c.stored
    lost = [cid for cid in live if cid not in copies]
    if lost:
        raise MissingObject(
            f"{len(lost)} chunk(s) referenced by generations have no copy in any existing "
            f"pack (e.g. {lost[0].hex()[:16]}); prune changes nothing in a damaged repository",
            hint="run 'dedupe verify' to see which generations are affected, forget them or "
            "back the data up again as a full, then prune",
        )

    stale = (
        stale_key_packs(store, records, reencrypt_below) if reencrypt_below is not None else set()
    )

    def fraction(pack_id: bytes) -> float:
        return live_in_pack[pack_id] / max(1, records[pack_id].length)

    chosen: dict[bytes, _Copy] = {}
    used: dict[bytes, int] = defaultdict(int)
    for chunk_id in live:
        best = max(
            copies[chunk_id],
            key=lambda c: (c.pack_id not in stale, fraction(c.pack_id), c.pack_id),
        )
        chosen[chunk_id] = best
        used[best.pack_id] += best.stored

    blobs: dict[bytes, int] = defaultdict(int)
    for pack_id, _cid in listed:
        blobs[pack_id] += 1
    del listed

    def unused_fraction(pid: bytes) -> float:
        length = records[pid].length
        return max(0, length - used[pid] - pack_overhead(blobs[pid])) / max(1, length)

    unused = [pid for pid in records if used[pid] == 0]
    sparse = [
        pid
        for pid in records
        if used[pid] > 0 and pid in present and (unused_fraction(pid) > threshold or pid in stale)
    ]
    kept = [pid for pid in records if used[pid] > 0 and pid not in set(sparse)]
    unindexed = sorted(present - set(records))
    sparse_set = set(sparse)
    kept_set = set(kept)

    bytes_before = sum(records[pid].length for pid in records if pid in present)
    unindexed_bytes = 0
    if unindexed:
        sizes = await _gather_limited(
            [backend.stat(pack_name(pid)) for pid in unindexed], READ_CONCURRENCY
        )
        unindexed_bytes = sum(sizes)
    bytes_before += unindexed_bytes
    to_delete = [pid for pid in unused if pid in present] + sparse + unindexed
    changed = bool(unused or sparse or len(index_names) > 1)
    moving = [(cid, c) for cid, c in chosen.items() if c.pack_id in sparse_set]
    bytes_repacked = sum(c.stored for _cid, c in moving)

    # Every chunk id (live or not) that keeps a copy in a kept pack stays indexed: a later
    # backup may still dedupe against it. Live chunks use their chosen copy.
    keep_entries: dict[bytes, _Copy] = {}
    for chunk_id, cs in copies.items():
        if chunk_id in chosen:
            if chosen[chunk_id].pack_id in kept_set:
                keep_entries[chunk_id] = chosen[chunk_id]
        else:
            for c in cs:
                if c.pack_id in kept_set:
                    keep_entries[chunk_id] = c
                    break
    chunks_after = len(keep_entries) + len(moving)

    def make_report(written: list[PackRecord], seconds: float) -> PruneReport:
        written_bytes = sum(r.length for r in written) if not dry_run else bytes_repacked
        deleted_bytes = (
            sum(records[pid].length for pid in to_delete if pid in records) + unindexed_bytes
        )
        return PruneReport(
            dry_run=dry_run,
            generations=len(gen_ids),
            packs_before=len(present),
            packs_deleted=len(to_delete) - len(sparse),
            packs_repacked=len(sparse),
            packs_written=len(written),
            packs_after=len(present) - len(to_delete) + len(written),
            bytes_before=bytes_before,
            bytes_after=bytes_before - deleted_bytes + written_bytes,
            bytes_freed=deleted_bytes - written_bytes,
            bytes_repacked=bytes_repacked,
            chunks_live=len(live),
            chunks_removed=len(indexed_chunks) - chunks_after,
            index_objects_removed=len(index_names) if changed else 0,
            index_objects_written=1 if changed and (kept or moving) else 0,
            unindexed_packs=len(unindexed),
            seconds=time.monotonic() - started,
            removed_packs=[pid.hex() for pid in to_delete],
        )

    if dry_run:
        report_progress("done")
        return make_report([], 0.0)
    if not (changed or unindexed):
        left = await _drop_quarantine_records(store, present)
        await _tidy(store, planted)
        await _consolidate_keymaps(store, present, set(index_names), set(gen_ids), left)
        report_progress("done")
        return make_report([], 0.0)

    # --- 3a. repack: new packs with the live blobs of sparse packs -----------------------------
    new = IndexBatch()  # the new packs: records, ENTRY_RECORDs (local numbers), key entries
    flushed: list[str] = []  # index objects written along the way (re-encryption)
    if moving:
        report_progress("repacking")
        new, flushed = await _repack(
            store, moving, records, run, p, progress, REENCRYPT_FLUSH if stale else None
        )
    new_packs, new_entries = new.packs, new.records

    # --- 3b. one index object for everything that stays ----------------------------------------
    written_name = None
    if changed:
        report_progress("writing index")
        pack_list = [records[pid] for pid in kept] + new_packs
        numbers = {rec.pack_id: n for n, rec in enumerate(pack_list)}
        entry = ENTRY_RECORD.pack
        index_entries = bytearray()
        for cid, c in keep_entries.items():
            index_entries += entry(cid, numbers[c.pack_id], c.offset, c.stored, c.raw)
        base = len(kept)
        for cid, pack_no, offset, stored, raw in ENTRY_RECORD.iter_unpack(new_entries):
            index_entries += entry(cid, pack_no + base, offset, stored, raw)
        if pack_list:
            written_name = await store.write_index(pack_list, index_entries, new.keys)

        # --- 3c. then the old index objects ------------------------------------------------------
        report_progress("deleting index objects")
        await _delete_all(backend, [n for n in index_names + flushed if n != written_name])

    # --- 3d. then the packs nothing lists any more ------------------------------------------------
    report_progress("deleting packs")
    await _delete_all(backend, [pack_name(pid) for pid in to_delete])

    # --- 3e. quarantine records whose packs are all gone ------------------------------------------
    packs_left = (present - set(to_delete)) | {r.pack_id for r in new_packs}
    left = await _drop_quarantine_records(store, packs_left)

    # --- 3f. what interrupted writers left: key files the keyring does not list (a `key
    # add`), temporary files of killed puts, a keyring copy left behind -----------------------
    await _tidy(store, planted)

    # --- 3g. key maps: one consolidated set for what remains ------------------------------------
    report_progress("consolidating key maps")
    index_left = set(trusted)
    if changed:
        index_left = {written_name} if written_name else set()
    await _consolidate_keymaps(store, packs_left, index_left, set(gen_ids), left)

    await reload_index(store)
    report_progress("done")
    return make_report(new_packs, time.monotonic() - started)


async def _repack(
    store: RepositoryStore,
    moving: list[tuple[bytes, _Copy]],
    records: dict[bytes, PackRecord],
    run: Callable[..., Awaitable[Any]],
    p: Progress,
    progress: ProgressCallback | None,
    flush_every: int | None = None,
) -> tuple[IndexBatch, list[str]]:
    """Read, check and re-seal the live blobs of sparse packs into new packs (written to
    the backend). Returns the new packs' batch: records, index entries (pack numbers local
    to it) and key map entries, and the names of the index objects written on the way:
    with `flush_every`, each time that many new packs are written they are indexed (after
    their key map), so that a killed run leaves them usable (the batch still lists them,
    for the one index object prune then writes)."""
    by_pack: dict[bytes, list[tuple[bytes, _Copy]]] = defaultdict(list)
    for chunk_id, c in moving:
        by_pack[c.pack_id].append((chunk_id, c))
    codec = store.codec
    packer = PackWriter(store.pack_size)
    done = IndexBatch()  # every new pack, for the index object prune writes
    flushed: list[str] = []
    since_flush = IndexBatch()

    def ranges(
        items: list[tuple[bytes, _Copy]],
    ) -> list[tuple[int, int, list[tuple[bytes, _Copy]]]]:
        items.sort(key=lambda it: it[1].offset)
        out: list[tuple[int, int, list[tuple[bytes, _Copy]]]] = []
        for it in items:
            off, end = it[1].offset, it[1].offset + it[1].stored
            if out and off - out[-1][1] <= COALESCE_GAP and end - out[-1][0] <= MAX_RANGE:
                start, prev_end, group = out[-1]
                out[-1] = (start, max(prev_end, end), group + [it])
            else:
                out.append((off, end, [it]))
        return out

    async def fetch(pack_id: bytes) -> list[FramedBatch]:
        """The pack's live chunks, checked and framed again for sealing."""
        what = f"pack {pack_id.hex()}"
        found = await store.keymaps.find(PACK, pack_id, what)
        key = store.keymaps.read_key(found, what)
        out: list[FramedBatch] = []
        for start, end, group in ranges(by_pack[pack_id]):
            data = await store.backend.get(pack_name(pack_id), start, end - start)

            def reframe(
                data: bytes = data, start: int = start, group: list[Any] = group
            ) -> FramedBatch:
                items = [(cid, c.offset, c.stored, c.raw) for cid, c in group]
                plain = codec.open_many(key, data, start, items)
                return codec.frame(plain, [cid for cid, _c in group])

            out.append(await run(reframe))
            p.bytes_read += end - start
        return out

    async def write(finished: list[Any]) -> None:
        for pack in finished:
            await store.write_finished_pack(pack, since_flush)
            p.bytes_stored += len(pack.data)
            packer.recycle(pack)
            if flush_every is not None and len(since_flush.packs) >= flush_every:
                await flush()

    async def flush() -> None:
        nonlocal since_flush
        if flush_every is not None and since_flush:
            flushed.append(await store.write_batch(since_flush))
        # Into the batch for prune's index object, pack numbers moved past what it holds.
        base = len(done.packs)
        done.packs.extend(since_flush.packs)
        done.keys.extend(since_flush.keys)
        for cid, pack_no, offset, stored, raw in ENTRY_RECORD.iter_unpack(since_flush.records):
            done.records += ENTRY_RECORD.pack(cid, pack_no + base, offset, stored, raw)
        since_flush = IndexBatch()

    # Fetch a few packs ahead while the current one is sealed and written.
    order = sorted(by_pack)
    ahead: list[asyncio.Task[list[FramedBatch]]] = []
    try:
        for i in range(len(order)):
            while len(ahead) < READ_CONCURRENCY and len(ahead) + i < len(order):
                ahead.append(asyncio.ensure_future(fetch(order[len(ahead) + i])))
            for batch in await ahead.pop(0):
                p.chunks += batch.pending
                await write(await run(packer.add, batch))
            if progress:
                progress(p)
        last = await run(packer.flush)
        await write([last] if last is not None else [])
        await flush()
    finally:
        for t in ahead:
            t.cancel()
        await asyncio.gather(*ahead, return_exceptions=True)
        release_buffers()
    return done, flushed


async def _delete_all(backend: Backend, names: list[str]) -> None:
    async def delete(name: str) -> None:
        try:
            await backend.delete(name)
        except MissingObject:  # gone already (an interrupted earlier prune)
            pass

    await _gather_limited([delete(n) for n in names], DELETE_CONCURRENCY)


async def _drop_quarantine_records(store: RepositoryStore, packs_left: set[bytes]) -> set[str]:
    """Delete quarantine records none of whose packs exists any more: the damaged copies
    they name are unreachable, so they no longer need honouring (docs/FORMAT.md 13).
    Returns the names of the records that remain."""
    left: set[str] = set()
    for name in await store.backend.list(QUARANTINE_PREFIX):
        try:
            data = await store.backend.get(name)
        except MissingObject:
            continue
        key = await store.quarantine_key(name)
        triples = await asyncio.to_thread(decode_quarantine, key, name, data)
        if any(pack_id in packs_left for _c, pack_id, _r in triples):
            left.add(name)
        else:
            await _delete_all(store.backend, [name])
    return left


async def _tidy(store: RepositoryStore, planted: list[str]) -> None:
    """Remove what interrupted writers left, which no lock-holder can be writing now (key
    commands and backups exclude prune): manifests no key map vouches for (`planted`),
    key files the keyring does not list (an interrupted `key add`; they open nothing,
    docs/FORMAT.md 4.2), temporary files of killed puts, and a keyring copy left behind by
    an interrupted key change (both copies get the verified newest one's bytes)."""
    listed = {k.key_id.hex() for k in store.keyring.keys}
    orphans = [n for n in await store.backend.list(KEYS_PREFIX) if key_id_of(n) not in listed]
    await _delete_all(store.backend, orphans + planted)
    await store.backend.remove_leftovers()
    await store.heal_keyring()


def _oid(name: str) -> bytes:
    return bytes.fromhex(name.rsplit("/", 1)[-1])


async def _consolidate_keymaps(
    store: RepositoryStore,
    packs: set[bytes],
    index_names: set[str],
    gen_ids: set[str],
    quarantine_names: set[str],
) -> None:
    """Step f: the key maps rewritten as one set holding the entries of what remains."""
    keep = {
        PACK: packs,
        INDEX: {_oid(n) for n in index_names},
        GENERATION: {bytes.fromhex(g) for g in gen_ids},
        QUARANTINE: {_oid(n) for n in quarantine_names},
    }
    await store.keymaps.consolidate(
        store.holder, store.current_epoch, lambda kind, oid: oid in keep[kind]
    )
