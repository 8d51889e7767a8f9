"""Types of the native blob codec (built from _blobcodec.pyx + csrc/blobcodec.c)."""

from collections.abc import Sequence

from typing_extensions import Buffer

from dedupe.chunking import Block

OVERHEAD: int  # 40: nonce and tag of a sealed blob
TRAILER_RECORD: int  # 44: a pack trailer entry, <32sIII
OPEN_ERRORS: dict[int, str]

class OpenError(Exception):
    """A blob of a batch failed to open: .index is its position, .code the reason."""

    code: int
    index: int

def configure(functions: dict[str, int]) -> None:
    """Install the zstd and libsodium function addresses; once, before any other use."""

def release_pools() -> None:
    """Let go of the buffers kept for reuse (an operation calls this when it is done)."""

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
    def frame(self, chunks: list[Buffer], ids: list[bytes]) -> FramedBatch: ...
    def open_into(
        self,
        key: bytes,
        id_key: bytes,
        data: Buffer,
        items: Sequence[tuple[bytes, int, int, int]],
        base: int,
    ) -> Block: ...
    def open_records(
        self, key: bytes, id_key: bytes, data: Buffer, records: Buffer, lo: int, hi: int
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
    ) -> None: ...

def window_block(size: int) -> Block:
    """A pooled block of `size` bytes for a restore window's output."""

def copy_repeats(out: Block, copies: bytes) -> None:
    """Fill a window's repeated chunks (ddp_plan_copy records) in place."""

def seal(
    key: bytes, batch: FramedBatch, dst: bytearray, pos: int, target: int, records: bytearray
) -> int: ...
