"""`repair index`: rebuild the index from the packs themselves, when an index object is
damaged or lost (docs/FORMAT.md sections 6, 7 and 14.3).

A pack is self-describing: its sealed trailer lists every blob (chunk id, offset, stored
and raw length), and its key map entry gives the key that opens it. When an index object
cannot be used, the chunks it listed are "in no index object": restores that need them
fail, backups store them again, and prune refuses to run (it would take their packs for
garbage). This rebuilds what was lost, under the exclusive lock:

1. loads every index object that opens, and lists `packs/`; a pack none of them lists is
   *uncovered* (the lost object's packs, and any an interrupted backup left unindexed);
2. reads each uncovered pack whole and checks it as verify does: its bytes hash to its
   name, the footer is sound, the trailer opens with the key its (authenticated) key map
   entry gives, and every blob the trailer lists opens and is the chunk its id names. A
   pack with no key map entry is not ours to vouch for (planted, left by an interrupted
   backup, or of a removed key holder) and is skipped, as is one whose trailer does not
   open; a pack damaged in part is indexed without its bad blobs; all are reported;
3. writes ONE new index object listing the blobs that checked out (after its key map);
4. only then deletes the index objects that a key map vouches for but that do not open
   (damaged): every pack they described is covered again by step 3 (or was skipped and
   is reported). Index objects no key map vouches for are left to prune, which refuses
   to run until verify has shown them to be planted.

Safe to kill at any point: before step 3 nothing is written; after it, the new index
object duplicates what other objects may list (allowed: docs/FORMAT.md 7), and an index
object left undeleted is deleted by the next run or by prune. Blobs that fail their check
are left out (their chunks stay unindexed; verify names them), never listed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any

from dedupe._types import Progress, ProgressCallback
from dedupe.crypto import open_sealed
from dedupe.engine.verify import check_envelope, open_blobs
from dedupe.errors import DedupeError, IntegrityError, MissingObject
from dedupe.format.index import ENTRY_RECORD, PackRecord
from dedupe.format.keymap import INDEX, PACK
from dedupe.format.pack import (
    FOOTER_SIZE,
    PACK_MAGIC,
    TRAILER_AAD,
    decode_trailer_items,
    trailer_items,
)
from dedupe.hashing import object_id
from dedupe.store import RepositoryStore
from dedupe.store.locks import RepositoryLock
from dedupe.store.repository import named_ids

_Item = tuple[bytes, int, int, int]  # chunk id, offset, stored length, raw length

READ_CONCURRENCY = 2  # whole packs in memory at once (16 MiB each by default)


@dataclass(frozen=True)
class SkippedPack:
    pack: str  # hex id
    reason: str


@dataclass(frozen=True)
class RepairReport:
    """What `repair index` found and did. `index_object` is the index object written
    (None when every pack was covered already)."""

    packs: int  # in packs/
    packs_uncovered: int  # listed by no index object that opens
    packs_indexed: int
    chunks_indexed: int
    blobs_left_out: int  # listed by a trailer, but did not open or match their id
    skipped: list[SkippedPack] = field(default_factory=list)  # not indexed at all
    damaged: list[SkippedPack] = field(default_factory=list)  # indexed, all but bad blobs
    index_object: str | None = None
    index_objects_removed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def repair_index(
    store: RepositoryStore,
    executor: Executor | None = None,
    progress: ProgressCallback | None = None,
) -> RepairReport:
    """Rebuild the index of the packs no usable index object lists (module docstring)."""
    async with RepositoryLock(
        store.backend, exclusive=True, operation="repair index", wait=store.lock_wait
    ) as held:
        return await _repair(store, executor, progress, held.confirm)


async def _repair(
    store: RepositoryStore,
    executor: Executor | None,
    progress: ProgressCallback | None,
    confirm: Callable[[], Awaitable[None]],
) -> RepairReport:
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    p = Progress("repair", "scanning")
    # What the store holds, never the local cache's copies (store/cache.py).
    await store.refresh_index(rebuild=True, cached=False)
    suspicious = await store.keymaps.refused_for_newer_keys()
    if suspicious:
        raise IntegrityError(
            f"{len(suspicious)} key map(s) of keys or epochs this keyring does not know "
            f"(e.g. {suspicious[0]}): repair changes nothing, since what they vouch for "
            "would look unauthenticated",
            hint="if this machine's keyring is older than the repository's (restored from "
            "an old copy), put the newest keyring back first",
        )
    damaged = await _damaged_index_objects(store)
    sized = await store.backend.list_sized("packs/")
    listed = named_ids(list(sized))
    uncovered = await _uncovered(store, list(listed))
    # No pack this repository writes is larger (a planted huge one is refused unread).
    largest = 2 * store.pack_size + (16 << 20)
    p.stage = "reading packs"
    p.bytes_total = sum(sized[listed[pid]] for pid in uncovered)
    if progress:
        progress(p)

    skipped: list[SkippedPack] = []
    damaged_packs: list[SkippedPack] = []
    found: dict[bytes, tuple[int, list[_Item]]] = {}  # pack id -> (length, good blobs)
    left_out = 0
    sem = asyncio.Semaphore(READ_CONCURRENCY)

    async def scan(pack_id: bytes) -> None:
        nonlocal left_out
        what = f"pack {pack_id.hex()}"
        if store.keymaps.get(PACK, pack_id) is None:
            skipped.append(
                SkippedPack(
                    pack_id.hex(),
                    "no key map entry vouches for it (left by an interrupted backup, or "
                    "planted): not indexed; prune deletes it",
                )
            )
            return
        if sized[listed[pack_id]] > largest:
            skipped.append(
                SkippedPack(pack_id.hex(), f"{sized[listed[pack_id]]} bytes: larger than any pack")
            )
            return
        async with sem:
            try:
                key = await store.pack_key_of(pack_id)
                data = await store.backend.get(listed[pack_id])
            except MissingObject:
                return  # deleted meanwhile by someone not holding a lock: nothing to index
            except DedupeError as e:
                skipped.append(SkippedPack(pack_id.hex(), e.message))
                return
            problems, records = await loop.run_in_executor(
                executor, check_envelope, data, pack_id, key, what
            )
            items = None if records is None else trailer_items(records)
            reasons = "; ".join(detail for _, detail in problems)
            if items is None:
                skipped.append(SkippedPack(pack_id.hex(), reasons or "no trailer"))
                return
            # A pack damaged in part (a flipped bit: its bytes no longer hash to its name)
            # still holds good blobs, each authenticated on its own: those are indexed,
            # as they would be had the damage come after the index was written.
            end = len(data) - FOOTER_SIZE  # blobs lie between the magic and the footer
            inside = [it for it in items if len(PACK_MAGIC) <= it[1] and it[1] + it[2] <= end]
            good = await loop.run_in_executor(executor, _good_blobs, store, key, data, inside)
            left_out += len(items) - len(good)
            if problems or len(good) < len(items):
                lost = len(items) - len(good)
                damaged_packs.append(
                    SkippedPack(
                        pack_id.hex(),
                        "; ".join(filter(None, [reasons, f"{lost} of {len(items)} blobs bad"])),
                    )
                )
            found[pack_id] = (len(data), good)
            p.bytes_read += len(data)
            if progress:
                progress(p)

    await asyncio.gather(*(scan(pid) for pid in uncovered))

    index_object = None
    packs: list[PackRecord] = []
    records = bytearray()
    for pack_id in sorted(found):
        length, items = found[pack_id]
        if not items:
            continue
        pack_no = len(packs)
        packs.append(PackRecord(pack_id, length))
        for chunk_id, offset, stored, raw in items:
            records += ENTRY_RECORD.pack(chunk_id, pack_no, offset, stored, raw)
    if packs:
        p.stage = "writing index"
        if progress:
            progress(p)
        await confirm()
        index_object = await store.write_index(packs, records)
    removed: list[str] = []
    for name in sorted(damaged):
        await confirm()
        try:
            await store.backend.delete(name)
        except MissingObject:
            continue
        removed.append(name)
    if removed or index_object:
        await store.refresh_index(rebuild=True)
    p.stage = "done"
    if progress:
        progress(p)
    return RepairReport(
        packs=len(listed),
        packs_uncovered=len(uncovered),
        packs_indexed=len(packs),
        chunks_indexed=len(records) // ENTRY_RECORD.size,
        blobs_left_out=left_out,
        skipped=sorted(skipped, key=lambda s: s.pack),
        damaged=sorted(damaged_packs, key=lambda s: s.pack),
        index_object=index_object,
        index_objects_removed=removed,
        seconds=round(time.monotonic() - started, 3),
    )


def _good_blobs(store: RepositoryStore, key: bytes, data: bytes, items: list[_Item]) -> list[_Item]:
    """The items whose blob opens and is the chunk its id names. A chunk listed twice is
    judged by each of its copies, not by its id."""
    bad = {chunk_id for chunk_id, _reason, _detail in open_blobs(store, key, data, items)}
    twice = {cid for cid, n in Counter(it[0] for it in items).items() if n > 1}
    return [
        it
        for it in items
        if it[0] not in bad or (it[0] in twice and not open_blobs(store, key, data, [it]))
    ]


async def _damaged_index_objects(store: RepositoryStore) -> list[str]:
    """The index objects a key map vouches for whose bytes, as the store holds them, do
    not hash to their name. One that hashes right but does not open is no damage this
    can repair (a forged or foreign key map entry, another format version), and one no
    key map vouches for is left to prune, which refuses until verify showed it planted."""
    damaged = []
    for name in sorted(store.damaged_index_objects):
        oid = name.rsplit("/", 1)[-1]
        if store.keymaps.get(INDEX, bytes.fromhex(oid)) is None:
            continue
        try:
            data = await store.backend.get(name)
        except MissingObject:
            continue
        if object_id(data) != oid:
            damaged.append(name)
    return damaged


async def _uncovered(store: RepositoryStore, pack_ids: list[bytes]) -> list[bytes]:
    """The packs (of `pack_ids`, in the store) some chunk of which no index object lists:
    those no index object names, and those an index object names but whose trailer
    holds a chunk the index lacks (an index object may name a pack yet list none of its
    chunks: a writer's, made to hide them). A pack whose trailer cannot be read or opened
    counts as uncovered: the scan reports why."""
    named = {record.pack_id for record in store.index.packs}
    uncovered = [pid for pid in pack_ids if pid not in named]
    sem = asyncio.Semaphore(8)

    async def check(pack_id: bytes) -> None:
        async with sem:
            try:
                key = await store.pack_key_of(pack_id)
                sealed = await store.pack_trailer(pack_id)
                what = f"the trailer of pack {pack_id.hex()}"
                items = decode_trailer_items(
                    bytes(open_sealed(key, sealed, TRAILER_AAD, what)), what
                )
            except MissingObject:
                return
            except DedupeError:
                uncovered.append(pack_id)
                return
        if any(store.index.get(chunk_id) is None for chunk_id, _o, _s, _r in items):
            uncovered.append(pack_id)

    await asyncio.gather(*(check(pid) for pid in pack_ids if pid in named))
    return sorted(uncovered)
