"""The in-memory chunk index: chunk id -> where a good copy of its blob is.

Built from every index object at open and extended by each backup. A chunk can have
several copies (two concurrent backups stored it; a full re-stored it because its pack
went missing or verify quarantined it). The index keeps one location per chunk and
prefers a usable one: a location is unusable when its pack is absent from the backend or
the (chunk, pack) pair is quarantined. A later version replaces the dict with the
compact native table (csrc/); the interface stays.
"""

from __future__ import annotations

from typing import NamedTuple

from dedupe.format.index import PackRecord


class ChunkLocation(NamedTuple):
    pack_no: int  # into ChunkIndex.packs
    offset: int
    stored_length: int
    raw_length: int


class ChunkIndex:
    def __init__(self) -> None:
        self.packs: list[PackRecord] = []
        self._pack_numbers: dict[bytes, int] = {}
        self._entries: dict[bytes, ChunkLocation] = {}
        self.missing_packs: set[int] = set()
        self.quarantined: set[tuple[bytes, bytes]] = set()  # (chunk id, pack id)
        self._present: set[bytes] | None = None  # pack ids the backend has; None: unknown

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._entries

    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        return self._entries.get(chunk_id)

    def usable(self, chunk_id: bytes) -> bool:
        """True when the chunk has a copy that backups may reference without re-storing."""
        loc = self._entries.get(chunk_id)
        return loc is not None and self._good(chunk_id, loc)

    def _good(self, chunk_id: bytes, loc: ChunkLocation) -> bool:
        return loc.pack_no not in self.missing_packs and (
            not self.quarantined
            or (chunk_id, self.packs[loc.pack_no].pack_id) not in self.quarantined
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

    def add(self, packs: list[PackRecord], entries: list[tuple[bytes, int, int, int, int]]) -> None:
        """Add one index object's content; pack numbers are local to the object."""
        numbers = [self.pack_number(p) for p in packs]
        present = self._present
        if present is not None:
            self.missing_packs |= {
                n for n, p in zip(numbers, packs, strict=True) if p.pack_id not in present
            }
        table = self._entries
        for chunk_id, pack_no, offset, stored, raw in entries:
            old = table.get(chunk_id)
            new = ChunkLocation(numbers[pack_no], offset, stored, raw)
            if old is None or (not self._good(chunk_id, old) and self._good(chunk_id, new)):
                table[chunk_id] = new
