"""The in-memory chunk index: chunk id -> where a good copy of its blob is.

Built from every index object at open and extended by each backup. A chunk can have
several copies (two concurrent backups stored it; a full re-stored it because its pack
went missing or verify quarantined it). The index keeps one location per chunk and
prefers a usable one: a location is unusable when its pack is absent from the backend or
the (chunk, pack) pair is quarantined. The table itself is native
(csrc/chunkindex.c): at most 56 bytes per chunk, loaded from index records in bulk.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from dedupe.crypto.aead import Buffer
from dedupe.errors import IntegrityError
from dedupe.format.index import PackRecord
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store._chunkindex import (
    PLAN_LENGTH,
    PLAN_MISSING,
    ChunkTable,
    chunk_records,
    cut_records,
    entries_by_pack,
    entry_records,
)

__all__ = [
    "PLAN_LENGTH",
    "PLAN_MISSING",
    "ChunkIndex",
    "ChunkLocation",
    "WindowPlan",
    "chunk_records",
    "cut_records",
    "entries_by_pack",
    "entry_records",
]

_RECORD = struct.Struct("<32sIIII")  # an index object entry (docs/FORMAT.md section 7)

# What plan_window returns for a window (csrc/windowplan.h): its output size, the
# distinct chunks' ids and ddp_plan_items (by pack and offset), the repeats'
# ddp_plan_copies, and the ranges to read: (pack_no, start, end, jobs), a job being the
# items [lo, hi) opened in one executor call.
WindowPlan = tuple[int, bytes, bytes, bytes, list[tuple[int, int, int, list[tuple[int, int]]]]]


class ChunkLocation(NamedTuple):
    pack_no: int  # into ChunkIndex.packs
    offset: int
    stored_length: int
    raw_length: int


class ChunkIndex:
    """Chunk id -> ChunkLocation, in the native compact table (csrc/chunkindex.c: at most
    56 bytes per chunk), plus the pack table its pack numbers point into."""

    def __init__(self) -> None:
        self.packs: list[PackRecord] = []
        self._pack_numbers: dict[bytes, int] = {}
        self._table = ChunkTable()
        self.missing_packs: set[int] = set()
        self.quarantined: set[tuple[bytes, bytes]] = set()  # (chunk id, pack id)
        self._present: set[bytes] | None = None  # pack ids the backend has; None: unknown

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, chunk_id: object) -> bool:
        return isinstance(chunk_id, bytes) and len(chunk_id) == 32 and chunk_id in self._table

    def memory_bytes(self) -> int:
        return self._table.memory_bytes()

    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        found = self._table.get(chunk_id)
        return None if found is None else ChunkLocation(*found)

    def plan_window(
        self, records: bytes, gap: int, max_range: int, batch: int, lead: int = 0
    ) -> tuple[int, int, WindowPlan | None]:
        """What restoring a window of chunk table records takes: _chunkindex.plan_window
        (csrc/windowplan.h), its output starting `lead` bytes into its buffer. Like
        get(), it takes the location the index holds."""
        return self._table.plan_window(records, gap, max_range, batch, lead)

    def absent_from_table(self, table: Buffer) -> list[bytes]:
        """The ids of a chunk table's records (CHUNK_RECORDs) that get() finds no
        location for, in table order (a repeated one each time): one native pass over the
        records where they lie."""
        flags = self._table.contains_records(table, CHUNK_RECORD.size)
        records = memoryview(table).cast("B")
        absent = []
        at = flags.find(0)
        while at >= 0:
            start = at * CHUNK_RECORD.size
            absent.append(bytes(records[start : start + 32]))
            at = flags.find(0, at + 1)
        return absent

    def usable(self, chunk_id: bytes) -> bool:
        """True when the chunk has a copy that backups may reference without re-storing."""
        found = self._table.get(chunk_id)
        return found is not None and self._good(chunk_id, found[0])

    def usable_many(self, ids: bytes) -> bytearray:
        """usable() of a batch: `ids` are 32-byte chunk ids back to back; one byte per id,
        1 where usable() is True. One native lookup for the batch; only when packs are
        missing or copies quarantined are the ids found checked one by one."""
        flags = self._table.contains_many(ids)
        if self.missing_packs or self.quarantined:
            at = flags.find(1)
            while at >= 0:
                if not self.usable(ids[at * 32 : at * 32 + 32]):
                    flags[at] = 0
                at = flags.find(1, at + 1)
        return flags

    def _good(self, chunk_id: bytes, pack_no: int) -> bool:
        return pack_no not in self.missing_packs and (
            not self.quarantined or (chunk_id, self.packs[pack_no].pack_id) not in self.quarantined
        )

    def pack_number(self, record: PackRecord) -> int:
        n = self._pack_numbers.get(record.pack_id)
        if n is None:
            n = self._pack_numbers[record.pack_id] = len(self.packs)
            self.packs.append(record)
        return n

    def set_present_packs(self, present: set[bytes]) -> None:
        """Mark packs the backend does not have; call before adding index objects so that
        their entries can replace locations in missing packs."""
        self.missing_packs = {n for n, p in enumerate(self.packs) if p.pack_id not in present}
        self._present = set(present)

    def note_written(self, pack_ids: list[bytes]) -> None:
        """Packs this process has just written exist, whatever the last listing said."""
        if self._present is not None:
            self._present.update(pack_ids)

    def quarantine(self, pairs: set[tuple[bytes, bytes]]) -> None:
        """(chunk id, pack id) pairs verify found damaged; set before adding index objects."""
        self.quarantined = set(pairs)

    def add_records(self, packs: list[PackRecord], records: Buffer, what: str) -> None:
        """Add one index object's content: its pack table and its entry records (48 bytes
        each, pack numbers local to the object). The first copy of a chunk wins, unless it
        is unusable and a later one is usable (ChunkIndex docstring)."""
        numbers = [self.pack_number(p) for p in packs]
        present = self._present
        if present is not None:
            self.missing_packs |= {
                n for n, p in zip(numbers, packs, strict=True) if p.pack_id not in present
            }
        try:
            duplicates = self._table.add_records(records, numbers)
        except ValueError as e:
            raise IntegrityError(f"{what}: {e}") from None
        if duplicates and (self.missing_packs or self.quarantined):
            view = memoryview(records)
            for i in duplicates:
                chunk_id, pack_no, offset, stored, raw = _RECORD.unpack_from(view, i * _RECORD.size)
                old = self._table.get(chunk_id)
                assert old is not None
                new_no = numbers[pack_no]
                if not self._good(chunk_id, old[0]) and self._good(chunk_id, new_no):
                    self._table.put(chunk_id, new_no, offset, stored, raw, True)
