"""Types of the native chunk table (built from _chunkindex.pyx + csrc/chunkindex.c)."""

from collections.abc import Sequence

from typing_extensions import Buffer

ID_BYTES: int  # 32: a chunk id
RECORD_BYTES: int  # 48: an index object entry, <32sIIII
NO_PACK: int  # 0xFFFFFFFF: pack_no of an absent id in get_many(); never stored
PLAN_ITEM_BYTES: int  # 24: a ddp_plan_item (csrc/windowplan.h)
PLAN_COPY_BYTES: int  # 24: a ddp_plan_copy
PLAN_MISSING: int  # plan_window: a record's chunk is not in the table
PLAN_LENGTH: int  # plan_window: a record's length is not the table's raw length

# plan_window's plan: window size, ids, items, copies, ranges of
# (pack_no, start, end, jobs as [(lo, hi), ...]).
WindowPlan = tuple[int, bytes, bytes, bytes, list[tuple[int, int, int, list[tuple[int, int]]]]]

def entry_records(trailer: Buffer, pack_no: int) -> bytes:
    """Index entries (48-byte <32sIIII) for one pack's trailer records (44-byte <32sIII),
    with pack_no put after each chunk id."""

def chunk_records(ids: list[bytes], chunks: Sequence[Buffer]) -> bytes:
    """Chunk table records (36-byte <32sI): ids[i] with len(chunks[i])."""

def entries_by_pack(
    records: Buffer, bounds: list[tuple[int, int]]
) -> tuple[dict[int, bytes], list[tuple[int, bytes]]]:
    """Index entries (48-byte) by pack as trailer records (44-byte), and the
    (pack_no, chunk id) of entries outside their pack's (first, end) bounds."""

def cut_records(records: Buffer, start: int, budget: int) -> tuple[int, int]:
    """From record `start`, the records whose lengths first sum to `budget` or more (or
    all): (number after the last taken, their lengths' sum)."""

class ChunkTable:
    """Compact chunk id -> (pack_no, offset, stored_length, raw_length) table (native).

    At most 56 bytes per entry once it holds 10,000 entries, growth included (45-48 in
    steady state): it keeps the first 24 bytes of an id (csrc/chunkindex.h says why), so
    two ids that agree in them are one key. Bulk calls release the GIL; while one runs, a
    call that would change the table raises RuntimeError. An id is any buffer of exactly
    32 bytes (ValueError otherwise); pack_no, offset and lengths are uint32, pack_no
    below NO_PACK."""

    def __init__(self, expected: int = 0) -> None:
        """An empty table with room for `expected` entries before its first growth."""
    def __len__(self) -> int: ...
    def __contains__(self, chunk_id: object) -> bool:
        """chunk_id must be a 32-byte buffer (TypeError / ValueError otherwise)."""
    def capacity(self) -> int:
        """Entries that fit before the next growth of the slot array."""
    def memory_bytes(self) -> int:
        """Bytes of memory the table holds (slot array, entries, directory)."""
    def reserve(self, n: int) -> None:
        """Make room for n entries in all: one rebuild instead of several."""
    def get(self, chunk_id: Buffer) -> tuple[int, int, int, int] | None:
        """(pack_no, offset, stored_length, raw_length), or None if absent."""
    def put(
        self,
        chunk_id: Buffer,
        pack_no: int,
        offset: int,
        stored_length: int,
        raw_length: int,
        overwrite: bool = False,
    ) -> bool:
        """Absent: add, return True. Present: replace only if overwrite; return False."""
    def add_records(self, records: Buffer, pack_map: Sequence[int]) -> list[int]:
        """Insert 48-byte <32sIIII records, pack_no mapped through pack_map; the first
        copy of an id wins. Returns the indices of the records not stored because their
        id was present. ValueError (nothing stored) if a pack_no is outside pack_map."""
    def contains_records(self, records: Buffer, stride: int) -> bytearray:
        """One byte per `stride`-byte record of records (each starting with a 32-byte
        chunk id): 1 present, 0 absent."""
    def contains_many(self, ids: Buffer) -> bytearray:
        """One byte per 32-byte id of ids (back to back): 1 present, 0 absent."""
    def get_many(self, ids: Buffer) -> bytearray:
        """16 bytes per id: native-order uint32 pack_no, offset, stored_length,
        raw_length (memoryview(out).cast("I")); absent: NO_PACK, 0, 0, 0."""
    def plan_window(
        self, records: Buffer, gap: int, max_range: int, batch: int, lead: int = 0
    ) -> tuple[int, int, WindowPlan | None]:
        """Plan a restore window of chunk table records (36-byte <32sI): (0, 0, plan),
        or (PLAN_MISSING or PLAN_LENGTH, first bad record's number, None). The window's
        output starts `lead` bytes into its buffer (the plan's places count from 0)."""
