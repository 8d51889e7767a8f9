"""Types of the native blob codec (built from _blobcodec.pyx + csrc/blobcodec.c)."""

from collections.abc import Sequence

from typing_extensions import Buffer

from dedupe.chunking import Block

OVERHEAD: int  # 40: nonce and tag of a sealed blob
TRAILER_RECORD: int  # 44: a pack trailer entry, <32sIII
REF_BYTES: int  # 8: a compression dictionary's ref
HOW_BYTES: int  # 9: open_into's `how` per blob: compression byte, then the ref it named
ENODICT: int  # OpenError.code: the blob's dictionary (.ref) was not given
EDICT: int  # OpenError.code: two dictionaries have the blob's ref (.ref)
OPEN_ERRORS: dict[int, str]

class OpenError(Exception):
    """A blob of a batch failed to open: .index is its position, .code the reason, .ref
    the dictionary ref it names for ENODICT and EDICT (else None)."""

    code: int
    index: int
    ref: bytes | None

def configure(functions: dict[str, int]) -> None:
    """Install the zstd and libsodium function addresses; once, before any other use."""

def release_pools() -> None:
    """Let go of the buffers kept for reuse (an operation calls this when it is done)."""

class ZstdDict:
    """One compression dictionary's zstd handles (CDict per level, DDict), made on first
    use and freed with it; ValueError when zstd refuses the bytes."""

    ref: bytes
    def __init__(self, ref: bytes, data: bytes) -> None: ...
    def prepare_compress(self, level: int) -> None: ...
    def prepare_decompress(self) -> None: ...

class DictTable:
    """The dictionaries an open call may use: (ref, ZstdDict, or None for an unusable
    ref) pairs; immutable."""

    def __init__(self, entries: list[tuple[bytes, ZstdDict | None]]) -> None: ...
    def __len__(self) -> int: ...

class FramedBatch:
    """Framed blobs of a batch, waiting to be sealed; `pending` counts those not sealed."""

    @property
    def pending(self) -> int: ...
    @property
    def framed_bytes(self) -> int: ...
    def next_sealed_size(self) -> int: ...

class BatchCodec:
    """One thread's codec (zstd contexts at `level`); the kernels run without the GIL."""

    def __init__(self, level: int) -> None: ...
    def frame(
        self, chunks: list[Buffer], ids: list[bytes], dictionary: ZstdDict | None = None
    ) -> FramedBatch: ...
    def open_into(
        self,
        key: bytes,
        id_key: bytes,
        data: Buffer,
        items: Sequence[tuple[bytes, int, int, int]],
        base: int,
        dicts: DictTable | None = None,
        how: bytearray | None = None,
    ) -> Block: ...
    def open_records(
        self,
        key: bytes,
        id_key: bytes,
        data: Buffer,
        records: Buffer,
        lo: int,
        hi: int,
        dicts: DictTable | None = None,
    ) -> None: ...
    def open_planned(
        self,
        key: bytes,
        id_key: bytes,
        data: Buffer,
        base: int,
        ids: bytes,
        items: bytes,
        lo: int,
        hi: int,
        out: Block,
        dicts: DictTable | None = None,
    ) -> None: ...

WINDOW_ALIGN: int  # window blocks start at a multiple of it (the page size)

def window_block(size: int) -> Block:
    """A pooled block of `size` bytes for a restore window's output, page-aligned."""

def copy_repeats(out: Block, copies: bytes) -> None:
    """Fill a window's repeated chunks (ddp_plan_copy records) in place."""

def seal(
    key: bytes, batch: FramedBatch, dst: bytearray, pos: int, target: int, records: bytearray
) -> int: ...
