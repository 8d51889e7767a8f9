"""Prune: remove the data that no generation references any more.

Under the exclusive repository lock (no backup runs meanwhile, so no chunk can become
referenced while we decide), prune:

1. reads every index object and lists `packs/`; a chunk is *live* when some generation's
   complete chunk table (`generation_chunks`, chains expanded) names it;
2. picks one copy of each live chunk (among packs that exist; preferring the pack with
   the largest live fraction, so that a re-run after a crash settles on the copies the
   interrupted run had just written), and classifies every pack:
   - *unused*: no chosen copy in it -> delete;
   - *sparse*: unused fraction of its bytes above `repack_threshold`, or holding a copy
     a quarantine record names (damaged) -> repack: its live blobs are read (ranged
     reads), opened and checked, re-framed and sealed into new packs under fresh keys;
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
      temporary files of killed puts, a stale keyring copy; and, told to, dictionary
      objects that can serve no reader (a misplaced copy is first stored under its name);
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
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import blake3

from dedupe._types import Progress, ProgressCallback
from dedupe.backends.base import Backend
from dedupe.crypto import OVERHEAD
from dedupe.crypto.aead import Buffer
from dedupe.engine.forget import parse_created
from dedupe.errors import (
    DedupeError,
    IntegrityError,
    KeyNotAvailable,
    MissingObject,
    UnsupportedFormat,
)
from dedupe.format.index import ENTRY_RECORD, PackRecord
from dedupe.format.keymap import DICTIONARY, DRILL, GENERATION, INDEX, PACK, QUARANTINE
from dedupe.format.pack import FOOTER_SIZE, PACK_MAGIC
from dedupe.store import PackWriter, RepositoryStore
from dedupe.store._prunetable import NO_NUMBER, PruneTable
from dedupe.store.blobs import MAX_REFS_PER_CALL, Dictionary, FramedBatch, release_buffers
from dedupe.store.dictionaries import (
    DICT_PREFIX,
    MAX_DICT_OBJECT,
    REF_SIZE,
    dict_name,
    parse_dict_name,
)
from dedupe.store.drills import DRILL_PREFIX, KEEP_DRILL_DAYS, KEEP_DRILLS
from dedupe.store.locks import RepositoryLock
from dedupe.store.quarantine import QUARANTINE_PREFIX, read_quarantine
from dedupe.store.repository import IndexBatch, named_ids, pack_name
from dedupe.store.tables import each_generation_table

T = TypeVar("T")

COALESCE_GAP = 256 * 1024  # read through gaps between live blobs smaller than this
MAX_RANGE = 8 * 1024 * 1024
# The most of an object under dicts/ that prune --delete-unauthenticated reads to see
# whether it is a writer's junk (it hashes to its name) or a grown dictionary (damage).
MAX_JUNK_READ = 64 * 1024 * 1024
READ_CONCURRENCY = 4
DELETE_CONCURRENCY = 8
DELETE_BATCH = 64  # deletions between two confirmations of the lock
CHECK_BATCH = 4096  # duplicate copies checked per round (each read from its pack)
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
    # With delete_unauthenticated: vouched objects under dicts/ that can serve no reader
    # (FORMAT.md 16), deleted; and misplaced copies stored under their true name first
    # ({old name: new name}), the old name deleted.
    dictionaries_deleted: list[str] = field(default_factory=list)
    dictionaries_moved: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
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
    delete_unauthenticated: bool = False,
    confirm: Callable[[], Awaitable[None]] | None = None,
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
    args = (repack_threshold, dry_run, progress, reencrypt_below, delete_unauthenticated)
    if not lock:
        return await _prune(store, executor, *args, confirm=confirm)
    async with RepositoryLock(
        store.backend, exclusive=True, operation="prune", wait=store.lock_wait
    ) as held:
        return await _prune(store, executor, *args, confirm=held.confirm)


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
    delete_unauthenticated: bool = False,
    *,
    confirm: Callable[[], Awaitable[None]] | None = None,
) -> PruneReport:
    started = time.monotonic()
    # Each step that writes or deletes first confirms the exclusive lock (dedupe.store.
    # locks): a prune that was stopped past the stale time, or whose lock someone removed,
    # may have a backup running beside it now, whose new packs it would take for garbage.
    lock_held = confirm if confirm is not None else _lock_not_checked
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
    sizes = await backend.list_sized("packs/")
    pack_sizes = {
        pid: sizes[name] for pid, name in named_ids(list(sizes)).items() if sizes[name] is not None
    }
    present = set(pack_sizes)
    await store.refresh_keys()  # after listing: every listed index object's key map is in
    trusted = [n for n in index_names if store.keymaps.get(INDEX, _oid(n)) is not None]

    async def load(name: str) -> tuple[list[PackRecord], memoryview]:
        data = await backend.get(name)
        return await store.open_index_object(name, data)

    opened = await _gather_limited([load(n) for n in trusted], READ_CONCURRENCY)
    loaded = list(zip(trusted, opened, strict=True))
    del opened
    # Copies verify found damaged or missing (docs/FORMAT.md section 13) are no copies.
    quarantined = await read_quarantine(backend, store.open_quarantine)

    # A writer stores an object's key map before the object, so in a sound repository
    # every manifest and index object is authenticated. One that is not was planted, or
    # its key maps were hidden, or the keyring was rolled back to before they were signed:
    # deleting on such a keyring's word could delete real data (FORMAT.md 14.3), so prune
    # refuses unless told that they are planted (`delete_unauthenticated`). It deletes
    # them then, and they hold nothing live.
    gen_ids, planted = [], []
    for gen_id in await store.generation_ids():
        if store.keymaps.get(GENERATION, bytes.fromhex(gen_id)) is None:
            planted.append(f"generations/{gen_id}")
        else:
            gen_ids.append(gen_id)
    # Dictionaries too: their key map entry is written before them (FORMAT.md 16). Of
    # those that have one, prune deletes only what can serve no reader (below).
    dict_sizes = await backend.list_sized(DICT_PREFIX)
    for name in sorted(dict_sizes):
        parsed = parse_dict_name(name)
        if parsed is None or store.keymaps.get(DICTIONARY, bytes.fromhex(parsed[1])) is None:
            planted.append(name)
    untrusted = [n for n in index_names if n not in set(trusted)]
    suspicious = await store.keymaps.refused_for_newer_keys()
    if (planted or untrusted or suspicious) and not delete_unauthenticated:
        named = (suspicious + planted + untrusted)[:5]
        raise IntegrityError(
            f"{len(planted)} manifest(s) or dictionaries and {len(untrusted)} index "
            f"object(s) no key map vouches for, and {len(suspicious)} key map(s) of keys or "
            f"epochs this keyring does not know (e.g. {'; '.join(named)}): prune deletes nothing",
            hint="if this machine's keyring is older than the repository's (restored from "
            "an old copy), put the newest keyring back first; if 'dedupe verify' shows these "
            "objects were planted, run 'dedupe prune --delete-unauthenticated'",
        )
    # Vouched dictionary objects that no reader can ever use (verify reports them at every
    # run) are not grounds to refuse: they say nothing against the keyring's word, and a
    # refusal would let whoever can copy a file stop every prune (and `key rotate
    # --reencrypt`, which prunes first). Told to, prune reads them and deletes them;
    # otherwise it names what its listing shows, and leaves them.
    if delete_unauthenticated:
        useless = await _useless_dictionaries(store, dict_sizes, run)
    else:
        useless = _Useless()
        for message in _useless_by_listing(store, dict_sizes):
            store.report(message)
    # Every entry of every trusted index object goes into one native table (56 bytes an
    # entry, sorted by chunk id: csrc/prunetable.h), numbered by pack; each index object
    # is let go of once it is in. The decisions below are taken over that table.
    records: dict[bytes, PackRecord] = {}
    for _name, (packs, _entries) in loaded:
        for rec in packs:
            records.setdefault(rec.pack_id, rec)
    # A pack the storage holds is as long as the storage says: index objects may disagree
    # (a writer can list a real pack with a length of its choosing), and the index object
    # prune writes must not carry such a length on once the writer's object is gone.
    for pid, rec in records.items():
        if pid in pack_sizes and pack_sizes[pid] != rec.length:
            records[pid] = PackRecord(pid, pack_sizes[pid])
    pack_ids = list(records)  # a pack's global number is its place here
    number = {pid: n for n, pid in enumerate(pack_ids)}
    table = PruneTable(len(pack_ids))
    loaded.reverse()
    while loaded:
        name, (packs, entries) = loaded.pop()
        try:
            table.add(entries, [number[rec.pack_id] for rec in packs])
        except ValueError as e:  # authenticated, yet an entry names no pack of its table
            raise IntegrityError(
                f"index object {name} is malformed ({e}): prune changes nothing",
                hint="run 'dedupe verify' to see what else is wrong",
            ) from None
    table.sort()
    # Copies in packs that are gone, and copies verify found damaged or missing, are no
    # copies: never chosen, never kept.
    table.unusable_packs(bytes(pid not in present for pid in pack_ids))
    for cid, pid in quarantined:
        if pid in number and len(cid) == 32:  # a longer or shorter id names no entry
            table.set_unusable(cid, number[pid])

    # --- which chunks are live: those some generation's complete table names -----------------
    unindexed_live: set[bytes] = set()  # live, and in no index object at all
    async for _gen_id, got in each_generation_table(store, gen_ids):
        if isinstance(got, Exception):
            raise got  # a chunk it references might be deleted: prune nothing
        for piece in got[1]:
            missing = table.mark_live(piece)
            unindexed_live.update(missing[i : i + 32] for i in range(0, len(missing), 32))

    # --- 2. choose one copy per chunk, classify packs ------------------------------------------
    stale = (
        stale_key_packs(store, records, reencrypt_below) if reencrypt_below is not None else set()
    )
    # A live chunk's copy is in the greatest pack by (pack not stale, the pack's live
    # fraction, pack id): the fraction counts the stored bytes of every live chunk with a
    # usable copy in the pack, once per chunk. The order is taken here, exactly, and the
    # table follows it.
    live_in_pack = table.live_bytes()

    def preference(n: int) -> tuple[bool, float, bytes]:
        pid = pack_ids[n]
        return (pid not in stale, live_in_pack[n] / max(1, records[pid].length), pid)

    rank = [0] * len(pack_ids)
    for r, n in enumerate(sorted(range(len(pack_ids)), key=preference)):
        rank[n] = r

    no_copy, first_lost = table.choose(rank)
    if unindexed_live or no_copy:
        example = next(iter(unindexed_live)) if unindexed_live else first_lost
        assert example is not None
        raise MissingObject(
            f"{len(unindexed_live) + no_copy} chunk(s) referenced by generations have no "
            f"copy in any existing pack (e.g. {example.hex()[:16]}); prune changes nothing "
            "in a damaged repository",
            hint="run 'dedupe verify' to see which generations are affected, forget them or "
            "back the data up again as a full, then prune",
        )

    # A live chunk with copies in several packs keeps one and may lose the others (their
    # packs unused, then deleted). Whoever indexed a copy may have lied about it (a writer
    # key can index a pack of garbage under real chunk ids and claim it is fuller than the
    # real one), so the copy kept is read and checked (AEAD, keyed id) before the others
    # may go; a bad one is dropped and the next best chosen (FORMAT.md 14.3). The table
    # hands out each chosen copy once.
    while not dry_run:
        bad: list[tuple[bytes, _Copy]] = []
        while batch := table.unchecked(CHECK_BATCH):
            report_progress("checking duplicate copies")
            todo = [
                (cid, _Copy(pack_ids[pack_no], offset, stored, raw))
                for cid, pack_no, offset, stored, raw in ENTRY_RECORD.iter_unpack(batch)
            ]
            bad += await _bad_copies(store, todo, run)
        if not bad:
            break
        for cid, c in bad:
            store.report(
                f"the index entry of chunk {cid.hex()[:16]} in pack {c.pack_id.hex()} does "
                "not open: another copy is kept"
            )
            table.set_unusable(cid, number[c.pack_id], c.offset, c.stored, c.raw)
        no_copy, first_lost = table.choose(rank)
        if no_copy:
            assert first_lost is not None
            raise MissingObject(
                f"chunk {first_lost.hex()[:16]}, which generations reference, has no good "
                "copy; prune changes nothing in a damaged repository",
                hint="run 'dedupe verify --read-data' to see which generations are "
                "affected, and back them up again as a full",
            )

    used_list, blobs_list = table.usage()
    used = dict(zip(pack_ids, used_list, strict=True))
    blobs = dict(zip(pack_ids, blobs_list, strict=True))
    del used_list, blobs_list

    def unused_fraction(pid: bytes) -> float:
        length = records[pid].length
        return max(0, length - used[pid] - pack_overhead(blobs[pid])) / max(1, length)

    unused = [pid for pid in records if used[pid] == 0]
    # A pack verify found a damaged or lost copy in is rewritten whatever its waste: its
    # good blobs move (each checked as it is read), and the damaged pack goes, so that
    # once the lost chunks are stored again (a backup, a repair from a replica) verify
    # is clean again.
    damaged = {pid for _cid, pid in quarantined}
    sparse = [
        pid
        for pid in records
        if used[pid] > 0
        and pid in present
        and (unused_fraction(pid) > threshold or pid in stale or pid in damaged)
    ]
    sparse_set = set(sparse)
    kept = [pid for pid in records if used[pid] > 0 and pid not in sparse_set]
    unindexed = sorted(present - set(records))

    bytes_before = sum(records[pid].length for pid in records if pid in present)
    unindexed_bytes = sum(pack_sizes[pid] for pid in unindexed)
    bytes_before += unindexed_bytes
    to_delete = [pid for pid in unused if pid in present] + sparse + unindexed
    changed = bool(unused or sparse or len(index_names) > 1 or untrusted)
    # The chosen copies in sparse packs move (records in (pack, offset) order); every
    # other chunk id (live or not) with a usable copy in a kept pack stays indexed: a
    # later backup may still dedupe against it. Live chunks use their chosen copy.
    moving, bytes_repacked = table.moving(bytes(pid in sparse_set for pid in pack_ids))
    kept_numbers = [NO_NUMBER] * len(pack_ids)
    for n, pid in enumerate(kept):
        kept_numbers[number[pid]] = n
    chunks_after = table.kept_count(kept_numbers) + len(moving) // ENTRY_RECORD.size
    repacks = bool(moving)
    chunks_live = table.live_ids()
    chunks_indexed = table.ids()

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
            chunks_live=chunks_live,
            chunks_removed=chunks_indexed - chunks_after,
            index_objects_removed=len(index_names) if changed else 0,
            index_objects_written=1 if changed and (kept or repacks) else 0,
            unindexed_packs=len(unindexed),
            seconds=time.monotonic() - started,
            removed_packs=[pid.hex() for pid in to_delete],
            dictionaries_deleted=[n for n in useless.why if n not in useless.moves],
            dictionaries_moved={old: new for old, (new, _data) in useless.moves.items()},
        )

    if dry_run:
        report_progress("done")
        return make_report([], 0.0)
    if not (changed or unindexed):
        await lock_held()
        await _drop_quarantine_records(store, present)
        await _drop_old_drills(store, lock_held)
        await _drop_useless_dictionaries(store, useless, lock_held)
        await _tidy(store, planted)
        await _consolidate_keymaps(store)
        report_progress("done")
        return make_report([], 0.0)

    # --- 3a. repack: new packs with the live blobs of sparse packs -----------------------------
    new = IndexBatch()  # the new packs: records, ENTRY_RECORDs (local numbers), key entries
    flushed: list[str] = []  # index objects written along the way (re-encryption)
    if moving:
        report_progress("repacking")
        await lock_held()
        new, flushed = await _repack(
            store, moving, pack_ids, run, p, progress, REENCRYPT_FLUSH if stale else None
        )
    # Each buffer of entries goes as soon as its last use is past (tens of MiB at a
    # million chunks): the moving copies' records now, the others once the index object
    # is written, before the reload at the end loads the index again.
    del moving
    new_packs, new_entries, new_keys = new.packs, new.records, new.keys
    del new

    # --- 3b. one index object for everything that stays ----------------------------------------
    written_name = None
    if changed:
        report_progress("writing index")
        pack_list = [records[pid] for pid in kept] + new_packs
        # The kept packs are numbered first, in `kept` order; the new ones after them.
        index_entries = table.kept(kept_numbers)
        del table  # what is left to do needs none of it: its memory goes before sealing
        if new_entries:
            renumbered = bytearray()
            for cid, pack_no, offset, stored, raw in ENTRY_RECORD.iter_unpack(new_entries):
                renumbered += ENTRY_RECORD.pack(cid, pack_no + len(kept), offset, stored, raw)
            index_entries += renumbered
            del renumbered
        del new_entries
        if pack_list:
            await lock_held()
            written_name = await store.write_index(pack_list, index_entries, new_keys, load=False)
        del index_entries  # reload_index, at the end, reads them back

        # --- 3c. then the old index objects ------------------------------------------------------
        report_progress("deleting index objects")
        await _delete_all(
            backend, [n for n in index_names + flushed if n != written_name], lock_held
        )

    # --- 3d. then the packs nothing lists any more ------------------------------------------------
    report_progress("deleting packs")
    await _delete_all(backend, [pack_name(pid) for pid in to_delete], lock_held)

    # --- 3e. quarantine records whose packs are all gone ------------------------------------------
    packs_left = (present - set(to_delete)) | {r.pack_id for r in new_packs}
    await lock_held()
    await _drop_quarantine_records(store, packs_left)
    await _drop_old_drills(store, lock_held)

    # --- 3f. what interrupted writers left: temporary files of killed puts, a keyring copy
    # left behind; with delete_unauthenticated, planted manifests and dictionary objects
    # that can serve no reader ---------------------------------------------------------------
    await _drop_useless_dictionaries(store, useless, lock_held)
    await _tidy(store, planted)

    # --- 3g. key maps: one consolidated set, without the entries of what is gone --------------
    report_progress("consolidating key maps")
    await lock_held()
    await _consolidate_keymaps(store)

    await reload_index(store)
    report_progress("done")
    return make_report(new_packs, time.monotonic() - started)


def _coalesce(
    items: list[tuple[bytes, _Copy]],
) -> list[tuple[int, int, list[tuple[bytes, _Copy]]]]:
    """Blobs of one pack as (start, end, items) ranges to read, sorted by offset: gaps
    under COALESCE_GAP are read through, no range is longer than MAX_RANGE."""
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


async def _repack(
    store: RepositoryStore,
    moving: bytes,
    pack_ids: list[bytes],
    run: Callable[..., Awaitable[Any]],
    p: Progress,
    progress: ProgressCallback | None,
    flush_every: int | None = None,
) -> tuple[IndexBatch, list[str]]:
    """Read, check and re-seal the live blobs of sparse packs into new packs (written to
    the backend). `moving` holds their ENTRY_RECORDs in (pack, offset) order, pack numbers
    indexing `pack_ids`. Returns the new packs' batch: records, index entries (pack
    numbers local to it) and key map entries, and the names of the index objects written
    on the way: with `flush_every`, each time that many new packs are written they are
    indexed (after their key map), so that a killed run leaves them usable (the batch
    still lists them, for the one index object prune then writes)."""
    # Each pack's records are a slice of `moving`: only the packs being read are unpacked.
    size = ENTRY_RECORD.size
    slices: dict[bytes, tuple[int, int]] = {}
    start = 0
    while start < len(moving):
        pack_no = ENTRY_RECORD.unpack_from(moving, start)[1]
        end = start + size
        while end < len(moving) and ENTRY_RECORD.unpack_from(moving, end)[1] == pack_no:
            end += size
        slices[pack_ids[pack_no]] = (start, end)
        start = end

    def blobs_of(pack_id: bytes) -> list[tuple[bytes, _Copy]]:
        lo, hi = slices[pack_id]
        return [
            (cid, _Copy(pack_id, offset, stored, raw))
            for cid, _no, offset, stored, raw in ENTRY_RECORD.iter_unpack(moving[lo:hi])
        ]

    codec = store.codec
    packer = PackWriter(store.pack_size)
    done = IndexBatch()  # every new pack, for the index object prune writes
    flushed: list[str] = []
    since_flush = IndexBatch()

    async def fetch(pack_id: bytes) -> list[tuple[bytes | None, FramedBatch]]:
        """The pack's live chunks, checked and framed again for sealing, each with the
        dictionary its blob was compressed with (by ref; None: none), when the codec
        still holds it: what a backup compressed with a dictionary stays so."""
        key = await store.pack_key_of(pack_id)
        out: list[tuple[bytes | None, FramedBatch]] = []
        for start, end, group in _coalesce(blobs_of(pack_id)):
            data = await store.backend.get(pack_name(pack_id), start, end - start)

            def reframe(
                data: bytes = data, start: int = start, group: list[Any] = group
            ) -> list[tuple[bytes | None, FramedBatch]]:
                items = [(cid, c.offset, c.stored, c.raw) for cid, c in group]
                plain, refs = codec.open_as_stored(key, data, start, items)
                # Each ref's dictionary as the codec holds it now, looked up once; one it
                # has dropped since (None) is compressed without.
                held: dict[bytes | None, Dictionary | None] = {
                    ref: codec.dictionary(ref) for ref in set(refs) if ref is not None
                }
                by_ref: dict[bytes | None, tuple[list[Buffer], list[bytes]]] = {}
                for (cid, _c), chunk, ref in zip(group, plain, refs, strict=True):
                    chunks, ids = by_ref.setdefault(ref if held.get(ref) else None, ([], []))
                    chunks.append(chunk)
                    ids.append(cid)
                return [
                    (ref, codec.frame(chunks, ids, held[ref] if ref else None))
                    for ref, (chunks, ids) in by_ref.items()
                ]

            out += await run(reframe)
            p.bytes_read += end - start
        return out

    # A reader refuses the blobs of a pack that name more than MAX_REFS_PER_CALL
    # dictionaries (FORMAT.md 16); repacked blobs of several sources may name several: a
    # pack is finished early rather than take one more.
    refs_in_pack: set[bytes] = set()

    async def add(ref: bytes | None, batch: FramedBatch) -> None:
        nonlocal refs_in_pack
        if ref is not None and ref not in refs_in_pack and len(refs_in_pack) >= MAX_REFS_PER_CALL:
            last = await run(packer.flush)
            await write([last] if last is not None else [])
            refs_in_pack = set()
        finished = await run(packer.add, batch)
        if finished:  # what is left in the pack being filled is this batch's
            refs_in_pack = set()
        if ref is not None:
            refs_in_pack.add(ref)
        await write(finished)

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

    # Fetch a few packs ahead while the current one is sealed and written. In pack-number
    # order, not by id: the packs one backup wrote are numbered together (its index
    # object lists them), and a backup compresses with one dictionary, so the batches come
    # grouped by dictionary and a pack is rarely finished early for a fifth (in id order
    # the sources interleave and nearly every pack was).
    order = list(slices)
    ahead: list[asyncio.Task[list[tuple[bytes | None, FramedBatch]]]] = []
    try:
        for i in range(len(order)):
            while len(ahead) < READ_CONCURRENCY and len(ahead) + i < len(order):
                ahead.append(asyncio.ensure_future(fetch(order[len(ahead) + i])))
            for ref, batch in await ahead.pop(0):
                p.chunks += batch.pending
                await add(ref, batch)
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


async def _lock_not_checked() -> None:
    """For a caller of run_prune(lock=False) that passes no `confirm` (a test)."""


async def _delete_all(
    backend: Backend,
    names: list[str],
    lock_held: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Delete `names`; with `lock_held`, confirm the lock before every DELETE_BATCH of
    them, so that a prune stopped half way through a long list, past the stale time,
    deletes at most one batch more before it notices (docs/FORMAT.md 14.1)."""

    async def delete(name: str) -> None:
        try:
            await backend.delete(name)
        except MissingObject:  # gone already (an interrupted earlier prune)
            pass

    for start in range(0, len(names), DELETE_BATCH):
        if lock_held is not None:
            await lock_held()
        batch = names[start : start + DELETE_BATCH]
        await _gather_limited([delete(n) for n in batch], DELETE_CONCURRENCY)


async def _drop_quarantine_records(store: RepositoryStore, packs_left: set[bytes]) -> set[bytes]:
    """Delete quarantine records none of whose packs exists any more: the damaged copies
    they name are unreachable, so they no longer need honouring (docs/FORMAT.md 13).
    Returns the ids of the records deleted."""
    deleted: set[bytes] = set()
    for name in named_ids(await store.backend.list(QUARANTINE_PREFIX)).values():
        try:
            data = await store.backend.get(name)
        except MissingObject:
            continue
        triples = await store.open_quarantine(name, data)
        if not any(pack_id in packs_left for _c, pack_id, _r in triples):
            await _delete_all(store.backend, [name])
            deleted.add(_oid(name))
    return deleted


async def _drop_old_drills(
    store: RepositoryStore, lock_held: Callable[[], Awaitable[None]]
) -> None:
    """Drill records past keeping (docs/FORMAT.md 15): per name, all but the newest
    KEEP_DRILLS of those older than KEEP_DRILL_DAYS. A record that cannot be read stays:
    prune deletes nothing it cannot judge (verify reports it)."""
    cutoff = datetime.now(UTC) - timedelta(days=KEEP_DRILL_DAYS)
    by_name: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    for name, record in await store.read_drills(lambda _message: None):
        by_name[record["name"]].append((parse_created(record["started"]), name))
    old = []
    for drills in by_name.values():
        drills.sort(reverse=True)
        old += [name for started, name in drills[KEEP_DRILLS:] if started < cutoff]
    await _delete_all(store.backend, sorted(old), lock_held)


async def _tidy(store: RepositoryStore, planted: list[str]) -> None:
    """Remove what interrupted writers left, which no lock-holder can be writing now
    (backups and key commands exclude prune): temporary files of killed puts, and a
    keyring copy left behind by an interrupted key change (both copies get the verified
    newest one's bytes); and `planted`, manifests no key map vouches for, which prune was
    told to delete. Key files the keyring does not list stay: they open nothing, and one
    may belong to a keyring newer than this client's."""
    await _delete_all(store.backend, planted)
    await store.backend.remove_leftovers()
    await store.heal_keyring()


@dataclass
class _Useless:
    """Vouched objects under dicts/ that can serve no reader (FORMAT.md 16): why, by name;
    and for a misplaced copy whose true name does not hold its bytes, that name and the
    bytes to store there before the copy goes."""

    why: dict[str, str] = field(default_factory=dict)
    moves: dict[str, tuple[str, bytes]] = field(default_factory=dict)


async def _useless_dictionaries(
    store: RepositoryStore, sizes: dict[str, int], run: Callable[..., Awaitable[Any]]
) -> _Useless:
    """The objects among `sizes` (name: size, under dicts/) that a key map vouches for but
    that no reader can ever use, and that are not damage:
    - larger than a dictionary object can be, with bytes that hash to the id in their
      name: that id is those bytes for good, so no dictionary has it (a writer key can
      vouch for any junk of its own). One whose bytes do not hash to its name may be a
      real one grown: damage, which stays for verify to report;
    - a copy that opens, under a ref that is not its content's: no blob can use it there.
      The id fixes the bytes of dicts/<true ref>/<id> too, so when that name does not hold
      them (missing, or damaged) they are stored there first (`moves`): a storage
      attacker's move must not cost the last copy.
    An object that does not open, or that this key cannot open, stays: damage, or
    another's, for verify to report and a repair to settle."""
    useless = _Useless()
    holding: set[str] = set()  # true names that hold their bytes, or will
    for name in sorted(sizes):
        parsed = parse_dict_name(name)
        if parsed is None or store.keymaps.get(DICTIONARY, bytes.fromhex(parsed[1])) is None:
            continue  # not named as one, or planted: the caller's
        ref, dict_id = parsed
        if sizes[name] > MAX_JUNK_READ:  # anyone who can write files makes these for free
            store.report(
                f"{name} is {sizes[name]} bytes, more than prune reads to tell junk from a "
                "damaged dictionary: remove it by hand if 'dedupe verify' names it"
            )
            continue
        if sizes[name] > MAX_DICT_OBJECT:
            if await _hashes_to(store.backend, name, sizes[name], dict_id, run):
                useless.why[name] = f"{sizes[name]} bytes, more than a dictionary can be"
            continue
        try:
            data = await store.backend.get_small(name, MAX_DICT_OBJECT)
            plain = await store.open_dictionary_object(name, dict_id, data)
        except (IntegrityError, KeyNotAvailable, UnsupportedFormat):
            continue
        true_ref = store.hasher.chunk_id(plain)[:REF_SIZE]
        if true_ref == ref:
            continue  # serves its ref (or zstd refuses it, as it would anywhere)
        true_name = dict_name(true_ref, dict_id)
        if true_name not in holding:
            try:
                there: bytes | None = await store.backend.get_small(true_name, MAX_DICT_OBJECT)
            except IntegrityError:  # missing, or larger than it can be
                there = None
            if there != data:
                useless.moves[name] = (true_name, data)
            holding.add(true_name)
        useless.why[name] = f"a copy of dictionary {true_ref.hex()} under another ref"
    return useless


def _useless_by_listing(store: RepositoryStore, sizes: dict[str, int]) -> list[str]:
    """For a prune not told to delete them: what the listing alone shows of vouched objects
    under dicts/ that no reader can use, each said with the flag that removes them. A
    routine prune reads none of them (verify does): their number and size are anyone's
    who can write files, and prune holds the exclusive lock. Shown: objects larger than a
    dictionary can be, and ids under more than one ref (one id is one content, so one
    true ref: the others are copies). The only copy of one under a wrong ref is not."""
    flag = "'dedupe prune --delete-unauthenticated' removes what can serve no reader"
    messages: list[str] = []
    names_of: dict[str, list[str]] = defaultdict(list)
    for name in sorted(sizes):
        parsed = parse_dict_name(name)
        if parsed is None:
            continue  # none is here: prune refused to run beside planted objects
        if sizes[name] > MAX_DICT_OBJECT:
            messages.append(f"{name} is {sizes[name]} bytes, more than a dictionary can be: {flag}")
        else:
            names_of[parsed[1]].append(name)
    for dict_id, names in names_of.items():
        if len(names) > 1:
            messages.append(
                f"dictionary object {dict_id} is stored under {len(names)} refs "
                f"({', '.join(names)}), of which one at most serves: {flag}"
            )
    return messages


async def _hashes_to(
    backend: Backend, name: str, size: int, oid: str, run: Callable[..., Awaitable[Any]]
) -> bool:
    """Whether the first `size` bytes of object `name` hash to `oid`, read MAX_RANGE at a
    time (the object is too large to read whole)."""
    digest = blake3.blake3()
    for start in range(0, size, MAX_RANGE):
        try:
            part = await backend.get(name, start, min(MAX_RANGE, size - start))
        except IntegrityError:  # shorter than listed, or gone
            return False
        await run(digest.update, part)
    return bool(digest.hexdigest() == oid)


async def _drop_useless_dictionaries(
    store: RepositoryStore, useless: _Useless, lock_held: Callable[[], Awaitable[None]]
) -> None:
    """Step f, told to (delete_unauthenticated): store each misplaced copy whose true name
    does not hold its bytes there, then delete every object of `useless`. Killed between
    the two, the next run finds the copy under its true name and deletes the other."""
    if not useless.why:
        return
    await lock_held()
    for old, (new, data) in useless.moves.items():
        await store.backend.put(new, data)
        store.report(f"{old} moved to {new}, its true name: {useless.why[old]}")
    await _delete_all(store.backend, list(useless.why), lock_held)
    for name, why in useless.why.items():
        if name not in useless.moves:
            store.report(f"{name} deleted: it can serve no reader ({why})")


def _oid(name: str) -> bytes:
    return bytes.fromhex(name.rsplit("/", 1)[-1])


async def _consolidate_keymaps(store: RepositoryStore) -> None:
    """Step g: the key maps rewritten as one set, without the entries of objects that are
    gone (prune deleted them, or an interrupted run or forget did). Under the exclusive
    lock no writer is between a key map and its object. An object hidden now loses
    nothing it had not lost already: prune keeps no index entry of a pack it cannot see,
    and counts no chunk of a manifest it cannot see as live."""
    present: dict[int, set[bytes]] = {}
    for kind, prefix in _PREFIXES.items():
        present[kind] = set(named_ids(await store.backend.list(prefix)))
    # A dictionary's entry stays whether or not its object is listed now: prune deletes
    # no dictionary a reader can use (FORMAT.md 16), so an entry of one it cannot see is
    # of one hidden from it, and dropping it would leave every blob compressed with it
    # unreadable once the object is back. (Dictionaries --reencrypt replaced, and objects
    # that could serve no reader, leave harmless entries.)
    await store.keymaps.consolidate(
        store.holder,
        store.current_epoch,
        lambda kind, oid: kind != DICTIONARY and oid not in present[kind],
    )


_PREFIXES = {
    PACK: "packs/",
    INDEX: "index/",
    GENERATION: "generations/",
    QUARANTINE: "quarantine/",
    DRILL: DRILL_PREFIX,
}


async def _bad_copies(
    store: RepositoryStore, items: list[tuple[bytes, _Copy]], run: Callable[..., Awaitable[Any]]
) -> list[tuple[bytes, _Copy]]:
    """The copies among `items` that do not open and check (their pack is gone or short,
    their key is not the pack's, their content is not the chunk), read in coalesced
    ranges of each pack."""
    by_pack: dict[bytes, list[tuple[bytes, _Copy]]] = defaultdict(list)
    for cid, c in items:
        by_pack[c.pack_id].append((cid, c))
    bad: list[tuple[bytes, _Copy]] = []
    codec = store.codec

    def check(
        key: bytes, data: bytes, start: int, group: list[tuple[bytes, _Copy]]
    ) -> list[tuple[bytes, _Copy]]:
        failed = []
        with codec.one_pack():  # the range's dictionaries loaded once, at most 4 of them
            for cid, c in group:
                blob = memoryview(data)[c.offset - start : c.offset - start + c.stored]
                try:
                    if len(blob) != c.stored:
                        raise IntegrityError("cut off")
                    codec.open(key, cid, blob, c.raw)
                except IntegrityError:
                    failed.append((cid, c))
        return failed

    for pack_id, group in by_pack.items():
        try:
            key = await store.pack_key_of(pack_id)
        except DedupeError:
            bad += group
            continue
        for start, end, part in _coalesce(group):
            try:
                data = await store.backend.get(pack_name(pack_id), start, end - start)
            except DedupeError:
                bad += part
                continue
            bad += await run(check, key, data, start, part)
    return bad
