"""The verify pipeline: find every damaged or missing object and the generations it breaks.

Two depths, like restic's `check` and borg's `check --verify-data`:

- **Trust** (always): both keyring copies verify under the admin key (a copy behind the
  other is a note, not damage); every key map under keymaps/ is accepted (docs/FORMAT.md
  4.5); every index object, manifest and quarantine record, and every pack an index
  object names, has an accepted key map entry. An object that has none is reported as
  "not authenticated": planted, forged, or of a retired epoch. Packs no authenticated
  index object names are counted (`packs_unindexed`), not judged: an interrupted backup
  leaves them, and prune removes them whoever put them there.
- **Structure** (always; reads no pack data): every index object is fetched and opened
  (object id, magic, AEAD, layout); every index entry lies inside its pack; every pack the
  index names exists and has the length its index record says; every quarantine record
  opens; every generation manifest opens (header and body authenticated, object id equal
  to its name, delta chains expanded through `generation_chunks`) and every chunk of it is
  in the index.
- **Data** (`read_data`, or a `subset` of the packs): each pack is read whole, at most
  READ_CONCURRENCY packs at a time (memory stays at a few packs whatever the repository
  size); its BLAKE3 must equal its name; the footer is decoded, the sealed trailer opened
  with the pack key and compared with the index entries; every blob is opened with
  `BlobCodec.open` (AEAD under the chunk id, decompression, keyed BLAKE3 against the id).
  CPU work runs on the caller's executor.

A generation is *affected* when a chunk of its `generation_chunks` table is not indexed, or
when the copy the index resolves it to (the copy a restore would read) is in a damaged or
missing place. Damaged copies are tracked as (chunk id, pack id) pairs: a chunk stored
twice is only lost if the copy restore uses is bad.

When damaged or missing chunk copies are found, one quarantine record (docs/FORMAT.md
section 12) listing those pairs is written, so that the next full backup re-stores the
chunks; `load_quarantine` reads the records back. Nothing is written when all is well.
Verify never raises for damage it finds: it returns a `VerifyReport` (the CLI turns a
failed report into `VerifyFailed`). It raises for what stops it from checking at all
(backend failures, a key that cannot read data, RepositoryLocked while a forget or prune
holds the exclusive lock, cancellation). It holds a shared lock throughout, as a backup
does, so that a prune cannot delete packs under it and make them look lost.
"""

from __future__ import annotations

import asyncio
import json
import math
import operator
import random
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, TypeVar

import blake3
import zstandard

from dedupe._types import Progress, ProgressCallback

# SubsetSpec is defined in dedupe._types (dedupe.api annotates verify() with it without
# loading this module) and is this module's name as well, the same object.
from dedupe._types import SubsetSpec as SubsetSpec
from dedupe.crypto import open_sealed
from dedupe.crypto.aead import Buffer
from dedupe.engine.restore import split_by_bytes
from dedupe.errors import (
    DedupeError,
    DictionaryUnusable,
    GenerationNotFound,
    IntegrityError,
    KeyNotAvailable,
    MissingObject,
    TruncatedObject,
    UnsupportedFormat,
)
from dedupe.format.index import PackRecord
from dedupe.format.keymap import MAX_KEYMAP_BYTES
from dedupe.format.keyring import KEYRING_NAMES, MAX_KEYRING_BYTES
from dedupe.format.manifest import CHUNK_RECORD, header_span
from dedupe.format.pack import (
    FOOTER_SIZE,
    PACK_MAGIC,
    TRAILER_AAD,
    TRAILER_RECORD,
    decode_footer,
    decode_trailer_records,
    trailer_items,
)
from dedupe.hashing import object_id
from dedupe.store import RepositoryStore
from dedupe.store.blobs import Dictionary, release_buffers
from dedupe.store.dictionaries import DICT_PREFIX, parse_dict_name
from dedupe.store.drills import DRILL_PREFIX, MAX_DRILL_BYTES
from dedupe.store.index import entries_by_pack
from dedupe.store.keyring import decode_keyring
from dedupe.store.locks import RepositoryLock
from dedupe.store.manifests import open_scratch, read_scratch, scratch_error, write_scratch
from dedupe.store.quarantine import (
    MAX_QUARANTINE_BYTES,
    QUARANTINE_PREFIX,
    read_quarantine,
)
from dedupe.store.readbuffers import ReadBuffers
from dedupe.store.repository import named_ids, pack_name
from dedupe.store.tables import Table, each_generation_table

T = TypeVar("T")

# --- vocabulary of the report -----------------------------------------------------------------

# Why an object (or a chunk copy) is damaged; most severe first (a DamagedObject's `reason`
# is the most severe of its problems, `details` lists them all).
MISSING = "missing"  # the object is not in the backend
NOT_AUTHENTICATED = "not authenticated"  # no accepted key map vouches for it (or signature)
TRUNCATED = "truncated"  # shorter than its index record (or its own footer) says
SIZE_MISMATCH = "size mismatch"  # longer than its index record says
AUTH_FAILED = "authentication failed"  # an AEAD tag (or a wrapped key) did not open
ID_MISMATCH = "id mismatch"  # its bytes do not hash to its name / a chunk to its id
# A blob authenticates but names a compression dictionary that cannot be had (missing,
# damaged, refused): the copy is unreadable until the dictionary is back.
DICTIONARY_UNUSABLE = "dictionary unusable"
MALFORMED = "malformed"  # authenticated, but the layout is wrong (bad magic, bad offsets)
TRAILER_MISMATCH = "trailer mismatch"  # the pack's trailer and the index disagree
NOT_INDEXED = "not indexed"  # chunks generations reference that no index object lists
REASONS = (
    MISSING,
    NOT_AUTHENTICATED,
    TRUNCATED,
    SIZE_MISMATCH,
    AUTH_FAILED,
    ID_MISMATCH,
    DICTIONARY_UNUSABLE,
    MALFORMED,
    TRAILER_MISMATCH,
    NOT_INDEXED,
)
KINDS = (
    "keyring",
    "keymap",
    "generation",
    "index",
    "pack",
    "dictionary",
    "quarantine",
    "drill",
)

# --- tuning -----------------------------------------------------------------------------------

READ_CONCURRENCY = 2  # whole packs held in memory at once while reading data
# Bytes of read buffers held at once (ReadBuffers): READ_CONCURRENCY whole 16 MiB packs
# (the size repositories have been made with by default; a pack ends a blob and its
# trailer past it) with their 1/8 headroom. Such packs, and smaller ones, are read two at
# a time as before; packs made larger than ~18 MiB (--pack-size) are read one at a time
# instead of holding 2 x 9/8 of a pack.
READ_BUFFER_BUDGET = 2 * (16 + 2) * 1024 * 1024
STAT_CONCURRENCY = 16
INDEX_CONCURRENCY = 8
OPEN_BATCH = 1024 * 1024  # stored bytes of blobs opened per executor job

_Item = tuple[bytes, int, int, int]  # chunk id, offset in pack, stored length, raw length
_OFFSET = operator.itemgetter(1)
_ENTRY = struct.Struct(TRAILER_RECORD)  # an _Item packed as a pack's trailer packs it


@dataclass(frozen=True)
class DamagedObject:
    """One damaged or missing object, or (kind "index", reason "not indexed", name
    "index") the chunks generations reference that no index object lists.

    `chunk_ids` (hex) are the chunks whose copy in this object is unusable: for a pack, the
    blobs that are missing, cut off or fail to open; for an index object, its entries that
    point outside their pack. Empty when the object is damaged but no chunk is lost (a
    flipped byte in a trailer). `generations` are the affected generation ids (see the
    module docstring); for a damaged manifest, its own id."""

    name: str  # "packs/ab/ab12..", "index/..", "generations/..", "quarantine/.."
    kind: str  # one of KINDS
    reason: str  # one of REASONS: the most severe problem
    details: list[str]
    chunk_ids: list[str]
    generations: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found. `ok` is True exactly when `damaged` is empty.

    Counts: `generations`, `index_objects` and `packs` (named by the index) checked;
    `packs_read`, `chunks_read` and `bytes_read` (pack bytes) by the data check;
    `chunks` the index entries checked; `packs_unindexed` packs in the backend that no
    index object names (normal after an interrupted backup; not damage). `quarantine` is
    the name of the quarantine record this run wrote, if any."""

    ok: bool
    read_data: bool
    subset: str | None
    generations: int
    index_objects: int
    packs: int
    packs_read: int
    packs_unindexed: int
    chunks: int
    chunks_read: int
    bytes_read: int
    damaged: list[DamagedObject]
    quarantine: str | None
    seconds: float
    notes: list[str] = field(default_factory=list)  # findings that are not damage
    # Generations whose lost chunks were stored again from a replica (Repository.verify
    # with replicas; dedupe/replication.py): one dict per generation.
    repaired: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_subset(text: str) -> SubsetSpec:
    """'10%' -> 0.1 (a random tenth of the packs); '2/5' -> (2, 5) (the second of five
    deterministic slices). Raises ValueError for anything else."""
    text = text.strip()
    if "/" in text:
        n_text, _, t_text = text.partition("/")
        try:
            n, t = int(n_text), int(t_text)
        except ValueError:
            raise ValueError(f"{text!r}: expected n/t with whole numbers, e.g. 1/5") from None
        spec: SubsetSpec = (n, t)
    elif text.endswith("%"):
        try:
            spec = float(text[:-1]) / 100
        except ValueError:
            raise ValueError(f"{text!r}: expected a percentage, e.g. 10%") from None
    else:
        raise ValueError(f"{text!r}: expected a percentage (10%) or a slice n/t (1/5)")
    _check_subset(spec)
    return spec


def _check_subset(spec: SubsetSpec) -> None:
    if isinstance(spec, frozenset):
        return
    if isinstance(spec, tuple):
        n, t = spec
        if not 1 <= n <= t:
            raise ValueError(f"subset {n}/{t}: need 1 <= n <= t")
    elif not (0 < spec <= 1 and math.isfinite(spec)):
        raise ValueError(f"subset fraction {spec!r} must be within (0, 1] (0% < x <= 100%)")


def _describe_subset(spec: SubsetSpec) -> str:
    if isinstance(spec, frozenset):
        return f"{len(spec)} named packs"
    if isinstance(spec, tuple):
        return f"{spec[0]}/{spec[1]}"
    return f"{spec * 100:g}%"


def select_packs(pack_ids: Iterable[bytes], spec: SubsetSpec | None) -> list[bytes]:
    """The packs a (subset) data check reads, sorted. A fraction takes a random sample of
    ceil(fraction * count) packs (at least one when there are any)."""
    ids = sorted(pack_ids)
    if spec is None:
        return ids
    if isinstance(spec, frozenset):
        return [p for p in ids if p in spec]
    _check_subset(spec)
    if isinstance(spec, tuple):
        n, t = spec
        return [p for p in ids if int.from_bytes(p[:8], "big") % t == n - 1]
    k = min(len(ids), math.ceil(spec * len(ids)))
    return sorted(random.SystemRandom().sample(ids, k))


async def load_quarantine(store: RepositoryStore) -> set[tuple[bytes, bytes]]:
    """Every (chunk id, pack id) pair the repository's quarantine records name."""
    return await read_quarantine(store.backend, store.open_quarantine)


# --- the pipeline -----------------------------------------------------------------------------


@dataclass
class _Damage:
    name: str
    kind: str
    reasons: set[str] = field(default_factory=set)
    details: list[str] = field(default_factory=list)
    chunks: set[bytes] = field(default_factory=set)
    generations: set[str] = field(default_factory=set)

    def freeze(self) -> DamagedObject:
        return DamagedObject(
            name=self.name,
            kind=self.kind,
            reason=min(self.reasons, key=REASONS.index),
            details=list(self.details),
            chunk_ids=sorted(c.hex() for c in self.chunks),
            generations=sorted(self.generations),
        )


class _RecordSpool:
    """The index's entries of every pack, packed (44 bytes each, as in a trailer), in an
    unnamed scratch file. Held as a set of tuples they took ~290 bytes each, and even
    packed in memory, 11 MiB per GiB of 4 KiB pages, so that verify's peak grew with the
    repository (46.6 MiB of a 277 MiB peak at 4 GiB: bench/README.md, "Peak memory at
    4 GiB"). A pack keeps where its entries lie, and they are read back, one pread per
    index object that lists it, while the pack is looked at."""

    def __init__(self) -> None:
        self._file: BinaryIO | None = None
        self._size = 0
        self._unflushed = False

    def append(self, data: bytes) -> tuple[int, int]:
        """Store `data`; returns where it lies (offset, length)."""
        if self._file is None:
            self._file = open_scratch()
        write_scratch(self._file, data)
        self._unflushed = True
        start, self._size = self._size, self._size + len(data)
        return start, len(data)

    def read(self, spans: list[tuple[int, int]]) -> bytes:
        if not spans:
            return b""
        assert self._file is not None
        if self._unflushed:
            try:
                self._file.flush()
            except OSError as e:
                raise scratch_error(e, "writing", "a") from None
            self._unflushed = False
        return b"".join(
            piece
            for start, length in spans
            for piece in read_scratch(self._file, start, start + length, length)
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class _Pack:
    record: PackRecord
    spool: _RecordSpool
    # Where the index's entries for this pack lie in the spool, one span per index
    # object that lists it, in the order they were read.
    spans: list[tuple[int, int]] = field(default_factory=list)
    size: int | None = None  # actual size; None until stat'ed, or missing

    def add(self, records: bytes) -> None:
        if records:
            self.spans.append(self.spool.append(records))

    def records(self) -> bytes:
        """Its index entries, packed, as the index objects list them."""
        return self.spool.read(self.spans)

    def entries(self) -> set[_Item]:
        """Its index entries (each once, however many index objects list it)."""
        return set(_ENTRY.iter_unpack(self.records()))

    def count(self) -> int:
        """How many distinct entries (as entries(), without a tuple apiece)."""
        r = self.records()
        size = _ENTRY.size
        return len({r[i : i + size] for i in range(0, len(r), size)})

    def chunk_ids(self) -> list[bytes]:
        """The chunks the index puts in this pack: all lost with it."""
        return list(dict.fromkeys(entry[0] for entry in _ENTRY.iter_unpack(self.records())))


async def _each(items: Iterable[T], workers: int, fn: Callable[[T], Awaitable[None]]) -> None:
    """Run fn over items with at most `workers` at a time (a fixed pool of tasks, not one
    task per item: repositories have millions of objects). The first failure cancels the
    rest and is raised."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await fn(item)

    # Not a TaskGroup: callers must see the error itself, not an ExceptionGroup.
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _reason_of(e: DedupeError) -> str:
    """The report's reason for an error a store check raised."""
    if isinstance(e, MissingObject):
        return MISSING
    if isinstance(e, TruncatedObject):
        return TRUNCATED
    if "not authenticated" in e.message or "signature" in e.message:
        return NOT_AUTHENTICATED
    if "hash to its name" in e.message or "match its name" in e.message or "its id" in e.message:
        return ID_MISMATCH
    if "authentication" in e.message or "does not open" in e.message:
        return AUTH_FAILED
    return MALFORMED


class _Verifier:
    def __init__(
        self,
        store: RepositoryStore,
        executor: Executor,
        progress: ProgressCallback | None,
    ) -> None:
        self.store = store
        self.backend = store.backend
        self.executor = executor
        self.loop = asyncio.get_running_loop()
        self.progress = progress
        self.p = Progress("verify", "checking index")
        self.damage: dict[str, _Damage] = {}
        # Unusable chunk copies: (chunk id, pack id) -> (reason, name of the damaged object).
        self.bad: dict[tuple[bytes, bytes], tuple[str, str]] = {}
        self.packs: dict[bytes, _Pack] = {}
        self.spool = _RecordSpool()
        self.index_objects = 0
        self.generations = 0
        self.packs_read = 0
        self.packs_unindexed = 0
        self.chunks_read = 0
        self.bytes_read = 0
        self.notes: list[str] = []
        # The chunk copies each authenticated quarantine record names, all of them, and
        # those of them this run read and found good (only these: a set of every copy read
        # would grow with the repository).
        self.quarantine_records: dict[str, set[tuple[bytes, bytes]]] = {}
        self.quarantined: set[tuple[bytes, bytes]] = set()
        self.read_ok: set[tuple[bytes, bytes]] = set()
        # Whole packs held in memory at once while reading data, one per reader.
        self.read_buffers = ReadBuffers(READ_CONCURRENCY, READ_BUFFER_BUDGET)

    # --- helpers ---

    def _report(self, stage: str | None = None) -> None:
        if stage is not None:
            self.p.stage = stage
        if self.progress is not None:
            self.progress(self.p)

    async def _objects(self, prefix: str) -> list[str]:
        """The names under `prefix` that are named as objects; anything else there is
        noted (it is no object of a dedupe repository, and nothing reads it)."""
        names = await self.backend.list(prefix)
        objects = list(named_ids(names).values())
        for stray in sorted(set(names) - set(objects)):
            self.notes.append(f"{stray} is not named as an object: ignored (remove it)")
        return objects

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.loop.run_in_executor(self.executor, fn, *args)

    def _damaged(
        self, name: str, kind: str, reason: str, detail: str, chunks: Iterable[bytes] = ()
    ) -> _Damage:
        d = self.damage.get(name)
        if d is None:
            d = self.damage[name] = _Damage(name, kind)
        d.reasons.add(reason)
        if detail not in d.details:
            d.details.append(detail)
        d.chunks.update(chunks)
        return d

    def _bad_copies(
        self, name: str, pack_id: bytes, reason: str, detail: str, chunks: Iterable[bytes]
    ) -> None:
        """Chunk copies in `pack_id` that cannot be read; `name` is the object to blame."""
        chunks = list(chunks)
        kind = "pack" if name.startswith("packs/") else "index"
        self._damaged(name, kind, reason, detail, chunks)
        for c in chunks:
            self.bad.setdefault((c, pack_id), (reason, name))

    # --- structure: index objects ---

    async def check_index(self) -> None:
        self._report("checking index")
        names = sorted(await self._objects("index/"))
        self.index_objects = len(names)

        async def one(name: str) -> None:
            try:
                data = await self.backend.get(name)
            except MissingObject:
                self._damaged(name, "index", MISSING, f"{name} vanished while verifying")
                return
            try:
                packs, records = await self.store.open_index_object(name, data)
            except (IntegrityError, UnsupportedFormat) as e:
                self._damaged(name, "index", _reason_of(e), e.message)
                return
            # Blobs lie between the pack magic and the footer.
            bounds = [(len(PACK_MAGIC), max(0, r.length - FOOTER_SIZE)) for r in packs]
            try:
                parts, outside_entries = entries_by_pack(records, bounds)
            except ValueError as e:  # an entry names a pack the object does not list
                self._damaged(name, "index", MALFORMED, f"{name}: {e}")
                return
            for pack_no in {*parts, *(pack_no for pack_no, _cid in outside_entries)}:
                record = packs[pack_no]
                info = self.packs.get(record.pack_id)
                if info is None:
                    info = self.packs[record.pack_id] = _Pack(record, self.spool)
                info.add(parts.get(pack_no, b""))
            outside: dict[bytes, list[bytes]] = {}
            for pack_no, chunk_id in outside_entries:
                outside.setdefault(packs[pack_no].pack_id, []).append(chunk_id)
            for pack_id, chunks in outside.items():
                self._bad_copies(
                    name,
                    pack_id,
                    MALFORMED,
                    f"{len(chunks)} entries point outside pack {pack_id.hex()}",
                    chunks,
                )

        await _each(names, INDEX_CONCURRENCY, one)

    async def check_quarantine_records(self) -> None:
        async def one(name: str, data: bytes) -> None:
            triples = await self.store.open_quarantine(name, data)
            pairs = {(c, p) for c, p, _reason in triples}
            self.quarantine_records[name] = pairs
            self.quarantined |= pairs

        await self._check_records(QUARANTINE_PREFIX, "quarantine", MAX_QUARANTINE_BYTES, one)

    async def check_drill_records(self) -> None:
        """A drill record that is not authenticated, or does not open, is reported: it
        is no evidence (status ignores it), and may be a planted one."""

        async def one(name: str, data: bytes) -> None:
            await self.store.open_drill(name, data)

        await self._check_records(DRILL_PREFIX, "drill", MAX_DRILL_BYTES, one)

    async def check_dictionaries(self) -> None:
        """Every compression dictionary (FORMAT.md 16): authenticated, its bytes against
        its name, its AEAD, its content against its ref, and a dictionary zstd accepts
        (verify runs with admin and reader keys, which open every dictionary)."""
        store = self.store
        for name in sorted(await self.backend.list(DICT_PREFIX)):
            parsed = parse_dict_name(name)
            if parsed is None:
                self.notes.append(f"{name} is not named as a dictionary: ignored (remove it)")
                continue
            ref, dict_id = parsed
            try:
                handle = Dictionary(ref, await store.open_dictionary(name, ref, dict_id))
                await self._run(handle.check)
                # Checked as a load would: reading the packs then needs no second read of
                # it (two of one ref that differ make the ref unusable, as a load does).
                store.codec.add_dictionary(handle)
            except (KeyNotAvailable, MissingObject):
                continue  # another writer's; or removed meanwhile
            except (IntegrityError, UnsupportedFormat) as e:
                self._damaged(name, "dictionary", _reason_of(e), e.message)

    async def _check_records(
        self, prefix: str, kind: str, limit: int, check: Callable[[str, bytes], Awaitable[None]]
    ) -> None:
        """Read each record under `prefix` (at most `limit` bytes) and `check` it; one that
        fails is damage of `kind`."""
        for name in sorted(await self._objects(prefix)):
            try:
                await check(name, await self.backend.get_small(name, limit))
            except MissingObject:
                continue
            except UnsupportedFormat as e:
                self._damaged(name, kind, MALFORMED, e.message)
            except IntegrityError as e:
                self._damaged(name, kind, _reason_of(e), e.message)

    # --- trust: keyring copies and key maps ---

    async def check_keyring(self) -> None:
        """Both copies must verify and be at the serial the store uses."""
        store = self.store
        for name in KEYRING_NAMES:
            try:
                ring = decode_keyring(
                    await self.backend.get_small(name, MAX_KEYRING_BYTES),
                    store.holder.admin_verify_key,
                    store.repository_id,
                    name,
                )
            except MissingObject:
                self._damaged(name, "keyring", MISSING, f"{name} is missing")
                continue
            except (IntegrityError, UnsupportedFormat) as e:
                self._damaged(name, "keyring", _reason_of(e), e.message)
                continue
            if ring.serial < store.keyring.serial:
                # Not damage: the newer copy is in effect (docs/FORMAT.md 4.3).
                self.notes.append(
                    f"{name} is at serial {ring.serial}, behind the other copy at "
                    f"{store.keyring.serial} (an interrupted key change, or an old copy put "
                    "back); the newer one is in effect, and the next prune or key change "
                    "rewrites it"
                )

    async def check_keymaps(self) -> None:
        """Every object under keymaps/ must be an accepted key map (of an active epoch)."""
        keymaps = self.store.keymaps
        await keymaps.refresh()
        for name in sorted(await keymaps.names(every_epoch=True)):
            if name in keymaps.loaded:
                continue
            reason = keymaps.rejected.get(name)
            if reason is None:  # not an active epoch's: find out why it was not loaded
                try:
                    keymaps.accept(name, await self.backend.get_small(name, MAX_KEYMAP_BYTES))
                    continue  # (written since the refresh)
                except MissingObject:
                    continue
                except (IntegrityError, UnsupportedFormat) as e:
                    reason = e.message
            self._damaged(name, "keymap", NOT_AUTHENTICATED, reason)

    # --- structure: packs ---

    async def check_packs(self) -> None:
        self._report("checking packs")
        present: set[bytes] = set()
        for n in await self.backend.list("packs/"):
            try:
                present.add(bytes.fromhex(n.rsplit("/", 1)[-1]))
            except ValueError:
                continue  # not a pack name: not ours to judge
        self.packs_unindexed = len(present - self.packs.keys())

        async def one(pack_id: bytes) -> None:
            info = self.packs[pack_id]
            name = pack_name(pack_id)
            try:
                info.size = await self.backend.stat(name)
            except MissingObject:
                self._bad_copies(
                    name,
                    pack_id,
                    MISSING,
                    f"pack {pack_id.hex()} is missing",
                    info.chunk_ids(),
                )
                return
            expected = info.record.length
            if info.size < expected:
                cut = [e[0] for e in info.entries() if e[1] + e[2] > info.size]
                self._bad_copies(
                    name,
                    pack_id,
                    TRUNCATED,
                    f"pack is {info.size} bytes, the index says {expected}: "
                    f"{len(cut)} blobs are cut off",
                    cut,
                )
            elif info.size > expected:
                self._damaged(
                    name,
                    "pack",
                    SIZE_MISMATCH,
                    f"pack is {info.size} bytes, the index says {expected}",
                )

        await _each(list(self.packs), STAT_CONCURRENCY, one)

    # --- data ---

    async def read_packs(self, spec: SubsetSpec | None) -> None:
        chosen = [p for p in select_packs(self.packs, spec) if self.packs[p].size is not None]
        self.p.bytes_total = sum(self.packs[p].size or 0 for p in chosen)
        self._report("reading packs")
        # READ_CONCURRENCY workers: at most that many packs are in memory at once.
        try:
            await _each(chosen, READ_CONCURRENCY, self._read_pack)
        finally:
            release_buffers()

    async def _read_pack(self, pack_id: bytes) -> None:
        info = self.packs[pack_id]
        assert info.size is not None  # read_packs chooses only packs that stat'ed
        name = pack_name(pack_id)
        async with self.read_buffers.take(info.size) as data:
            try:
                await self.backend.read_into(name, 0, data)
            except (MissingObject, TruncatedObject) as e:
                reason, what = (
                    (MISSING, "vanished") if isinstance(e, MissingObject) else (TRUNCATED, "shrank")
                )
                self._bad_copies(
                    name, pack_id, reason, f"pack {what} while verifying", info.chunk_ids()
                )
                return
            await self._check_pack(pack_id, name, data)
        self.p.bytes_read = self.bytes_read
        self.p.chunks = self.chunks_read
        self._report()

    async def _check_pack(self, pack_id: bytes, name: str, data: memoryview) -> None:
        """Everything about a pack that needs its bytes (`data`, only until this returns)."""
        info = self.packs[pack_id]
        self.packs_read += 1
        self.bytes_read += len(data)
        store = self.store
        key: bytes | None
        try:
            key = await store.pack_key(store.index.pack_number(info.record))
        except IntegrityError as e:
            key = None
            self._bad_copies(name, pack_id, _reason_of(e), e.message, info.chunk_ids())
        problems, records = await self._run(check_envelope, data, pack_id, key, name)
        for reason, detail in problems:
            self._damaged(name, "pack", reason, detail)
        if key is not None and records is not None and info.records() == records:
            # The common case: the index lists exactly the trailer's entries, in its order
            # (as the backup that wrote the pack indexed them). Open the blobs straight
            # from the packed records; any failure is looked at one blob at a time.
            count = len(records) // _ENTRY.size
            parts = -(-len(data) // OPEN_BATCH)  # one job per ~OPEN_BATCH of the pack
            cuts = [count * k // parts for k in range(parts + 1)]
            jobs = [
                self._run(check_records, store, key, data, records, lo, hi)
                for lo, hi in zip(cuts, cuts[1:], strict=False)
                if lo < hi
            ]
            for bad in await asyncio.gather(*jobs):
                for chunk_id, reason, detail in bad:
                    self._bad_copies(name, pack_id, reason, detail, [chunk_id])
            self.chunks_read += count
            if self.quarantined:
                self._note_read_ok(pack_id, trailer_items(records))
            return
        trailer = None if records is None else trailer_items(records)
        entries = info.entries()
        ordered = sorted(entries, key=_OFFSET)
        if trailer is not None and ordered != trailer:
            # Index and trailer disagree (the common case, equal lists, needs no sets).
            in_trailer = set(trailer)
            disagree = len(entries - in_trailer)
            if disagree:
                self._damaged(
                    name,
                    "pack",
                    TRAILER_MISMATCH,
                    f"{disagree} index entries are not in the pack's trailer",
                )
            # Blobs only the trailer lists are checked too: every blob is read.
            items = entries | {it for it in in_trailer if it[1] + it[2] <= len(data)}
            ordered = sorted(items, key=_OFFSET)
        if key is not None:
            jobs = [
                self._run(open_blobs, store, key, data, part)
                for part in split_by_bytes(ordered, OPEN_BATCH)
            ]
            for bad in await asyncio.gather(*jobs):
                for chunk_id, reason, detail in bad:
                    self._bad_copies(name, pack_id, reason, detail, [chunk_id])
            self.chunks_read += len(ordered)
            if self.quarantined:
                self._note_read_ok(pack_id, ordered)

    def _note_read_ok(self, pack_id: bytes, items: list[_Item]) -> None:
        """Quarantined copies in this pack that this verify read and found good."""
        self.read_ok.update(
            (it[0], pack_id)
            for it in items
            if (it[0], pack_id) in self.quarantined and (it[0], pack_id) not in self.bad
        )

    # --- generations ---

    async def check_generations(self) -> None:
        self._report("checking generations")
        not_indexed: dict[bytes, set[str]] = {}
        gen_ids = sorted(await self.store.generation_ids())
        async for gen_id, got in each_generation_table(self.store, gen_ids):
            name = f"generations/{gen_id}"
            if isinstance(got, GenerationNotFound):
                continue  # forgotten meanwhile
            if isinstance(
                got, DedupeError | zstandard.ZstdError | UnicodeDecodeError | json.JSONDecodeError
            ):
                self.generations += 1
                reason, detail = await self._classify_generation(gen_id, got)
                self._damaged(name, "generation", reason, detail).generations.add(gen_id)
                continue
            if isinstance(got, Exception):
                raise got
            _meta, table = got
            self.generations += 1
            missing, hits = await self._run(self._scan, table)
            for chunk_id in missing:
                not_indexed.setdefault(chunk_id, set()).add(gen_id)
            for pair in hits:
                self.damage[self.bad[pair][1]].generations.add(gen_id)
        if not_indexed:
            d = self._damaged(
                "index",
                "index",
                NOT_INDEXED,
                f"{len(not_indexed)} chunks that generations reference are in no index object",
                not_indexed,
            )
            for gens in not_indexed.values():
                d.generations |= gens

    def _scan(self, table: Table) -> tuple[list[bytes], set[tuple[bytes, bytes]]]:
        """(chunk ids not in the index, damaged copies the index resolves chunks to)."""
        index = self.store.index
        packs = index.packs
        bad = self.bad
        missing: list[bytes] = []
        hits: set[tuple[bytes, bytes]] = set()
        for piece in table:
            if not bad:  # the common case: one native pass (~1.5 us a chunk in Python)
                missing += index.absent_from_table(piece)
                continue
            for chunk_id, _raw in CHUNK_RECORD.iter_unpack(piece):
                loc = index.get(chunk_id)
                if loc is None:
                    missing.append(chunk_id)
                else:
                    pair = (chunk_id, packs[loc.pack_no].pack_id)
                    if pair in bad:
                        hits.add(pair)
        return missing, hits

    async def _classify_generation(self, gen_id: str, e: Exception) -> tuple[str, str]:
        detail = e.message if isinstance(e, DedupeError) else f"generation {gen_id}: {e}"
        try:
            data = await self.backend.get(f"generations/{gen_id}")
        except MissingObject:
            return MISSING, detail
        try:
            _start, end = header_span(data, f"generation {gen_id}")
        except DedupeError:
            return MALFORMED, detail
        if end > len(data) or blake3.blake3(data[:end]).hexdigest() != gen_id:
            return ID_MISMATCH, detail
        if isinstance(e, DedupeError):
            return _reason_of(e), detail
        return MALFORMED, detail

    # --- quarantine ---

    async def retire_false_quarantine(self) -> None:
        """Delete the quarantine records every copy of which this run read and found good
        (a pack hidden during an earlier verify, or a false record a reader key wrote):
        they would make backups store good chunks again, and prune refuse for good."""
        for name, pairs in self.quarantine_records.items():  # read by check_quarantine_records
            if pairs and pairs <= self.read_ok:
                try:
                    await self.backend.delete(name)
                except MissingObject:
                    continue  # retired meanwhile by another verify
                self.notes.append(
                    f"{name} named {len(pairs)} chunk copies that this verify read and found "
                    "good: deleted"
                )

    async def write_quarantine(self) -> str:
        chunks = sorted((c, p, reason) for (c, p), (reason, _name) in self.bad.items())
        return await self.store.write_quarantine(chunks)


def check_envelope(
    data: Buffer, pack_id: bytes, key: bytes | None, name: str
) -> tuple[list[tuple[str, str]], bytes | None]:
    """Problems of a whole pack outside its blobs, and its trailer's entries if it opens
    (packed: TRAILER_RECORD after TRAILER_RECORD, in pack order)."""
    problems: list[tuple[str, str]] = []
    if object_id(data) != pack_id.hex():
        problems.append((ID_MISMATCH, "the pack's bytes do not hash to its name"))
    if data[: len(PACK_MAGIC)] != PACK_MAGIC:
        problems.append((MALFORMED, "the pack does not start with the pack magic"))
    try:
        trailer_length = decode_footer(len(data), data[-FOOTER_SIZE:], f"pack {pack_id.hex()}")
    except TruncatedObject as e:
        problems.append((TRUNCATED, e.message))
        return problems, None
    except (IntegrityError, UnsupportedFormat) as e:  # a foreign or older pack footer
        problems.append((MALFORMED, e.message))
        return problems, None
    if key is None:
        return problems, None
    end = len(data) - FOOTER_SIZE
    what = f"the trailer of pack {pack_id.hex()}"
    try:
        plain = open_sealed(key, memoryview(data)[end - trailer_length : end], TRAILER_AAD, what)
    except IntegrityError:
        problems.append((AUTH_FAILED, f"{what} failed authentication"))
        return problems, None
    try:
        return problems, decode_trailer_records(bytes(plain), what)
    except IntegrityError as e:
        problems.append((MALFORMED, e.message))
        return problems, None


def check_records(
    store: RepositoryStore, key: bytes, data: Buffer, records: bytes, lo: int, hi: int
) -> list[tuple[bytes, str, str]]:
    """open_blobs for the blobs that packed trailer records lo..hi-1 name: in one native
    call when all of them open (the usual case), else one by one to name each bad one."""
    try:
        store.codec.check_records(key, data, records, lo, hi)
        return []
    except (IntegrityError, ValueError):
        pass
    return open_blobs(store, key, data, trailer_items(records[lo * _ENTRY.size : hi * _ENTRY.size]))


def open_blobs(
    store: RepositoryStore, key: bytes, data: Buffer, items: list[_Item]
) -> list[tuple[bytes, str, str]]:
    """(chunk id, reason, detail) of every blob among `items` that does not open."""
    if all(offset + stored <= len(data) for _, offset, stored, _ in items):
        try:  # the fast path: the whole batch at once, in the native kernel
            store.codec.open_joined(key, data, 0, items)
            return []
        except IntegrityError:
            pass  # find every bad blob and why, one at a time
    view = memoryview(data)
    bad: list[tuple[bytes, str, str]] = []
    # One pack: its blobs may name MAX_REFS_PER_CALL dictionaries in all, loaded once.
    with store.codec.one_pack():
        for chunk_id, offset, stored, raw in items:
            what = f"chunk {chunk_id.hex()}"
            if offset + stored > len(data):
                bad.append((chunk_id, TRUNCATED, f"{what} is cut off by the end of the pack"))
                continue
            blob = view[offset : offset + stored]
            try:
                store.codec.open(key, chunk_id, blob, raw)
            except DictionaryUnusable as e:  # raised only once the blob authenticated
                bad.append((chunk_id, DICTIONARY_UNUSABLE, e.message))
            except IntegrityError as e:
                # Tell a failed tag from content that authenticates but does not match its
                # id.
                try:
                    open_sealed(key, blob, chunk_id, what)
                    reason = ID_MISMATCH
                except IntegrityError:
                    reason = AUTH_FAILED
                bad.append((chunk_id, reason, e.message))
    return bad


async def verify_repository(
    store: RepositoryStore,
    executor: Executor,
    *,
    read_data: bool = False,
    subset: SubsetSpec | None = None,
    progress: ProgressCallback | None = None,
    quarantine: bool = True,
) -> VerifyReport:
    """Check the repository (see the module docstring) and return what was found.

    `read_data` reads every pack the index names; `subset` (implies reading data) reads a
    fraction or an n/t slice of them (SubsetSpec). `quarantine=False` writes no
    quarantine record even when chunk copies are damaged (for read-only repositories).
    Progress events have operation "verify" and stages "checking index", "checking
    packs", "reading packs" (bytes_read / bytes_total are pack bytes), "checking
    generations", "done"."""
    if subset is not None:
        _check_subset(subset)
        read_data = True
    started = time.monotonic()
    # A shared lock, like a backup's: prune (exclusive) cannot delete packs under us, which
    # would look like damage.
    v: _Verifier | None = None
    try:
        async with RepositoryLock(
            store.backend, exclusive=False, operation="verify", wait=store.lock_wait
        ) as held:
            await store.refresh_index()  # so the index resolves chunks as a restore now would
            v = _Verifier(store, executor, progress)
            await v.check_keyring()
            await v.check_keymaps()
            await v.check_index()
            await v.check_quarantine_records()
            await v.check_drill_records()
            await v.check_dictionaries()
            await v.check_packs()
            if read_data:
                await v.read_packs(subset)
            await v.check_generations()
            record = None
            if quarantine and read_data:
                await held.confirm()
                await v.retire_false_quarantine()
            if quarantine and v.bad:
                await held.confirm()
                record = await v.write_quarantine()
        chunks = sum(p.count() for p in v.packs.values())
    finally:
        if v is not None:
            v.spool.close()
    damaged = sorted(
        (d.freeze() for d in v.damage.values()), key=lambda d: (KINDS.index(d.kind), d.name)
    )
    v._report("done")
    return VerifyReport(
        ok=not damaged,
        read_data=read_data,
        subset=None if subset is None else _describe_subset(subset),
        generations=v.generations,
        index_objects=v.index_objects,
        packs=len(v.packs),
        packs_read=v.packs_read,
        packs_unindexed=v.packs_unindexed,
        chunks=chunks,
        chunks_read=v.chunks_read,
        bytes_read=v.bytes_read,
        damaged=damaged,
        quarantine=record,
        seconds=round(time.monotonic() - started, 3),
        notes=v.notes,
    )
