"""The in-memory chunk index: chunk id -> where its blob is.

Built from every index object at open and extended by each backup. A later version
replaces the dict with the compact native table (csrc/); the interface stays.
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

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._entries

    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        return self._entries.get(chunk_id)

    def pack_number(self, record: PackRecord) -> int:
        n = self._pack_numbers.get(record.pack_id)
        if n is None:
            n = self._pack_numbers[record.pack_id] = len(self.packs)
            self.packs.append(record)
        return n

    def add(self, packs: list[PackRecord], entries: list[tuple[bytes, int, int, int, int]]) -> None:
        """Add one index object's content; pack numbers are local to the object."""
        numbers = [self.pack_number(p) for p in packs]
        table = self._entries
        for chunk_id, pack_no, offset, stored, raw in entries:
            if chunk_id not in table:
                table[chunk_id] = ChunkLocation(numbers[pack_no], offset, stored, raw)
