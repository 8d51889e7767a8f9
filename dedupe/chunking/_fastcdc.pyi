"""Types of the native FastCDC extension (built from _fastcdc.pyx + csrc/fastcdc.c)."""

from typing_extensions import Buffer

from .params import ChunkerParams

class Block:
    """A read-only block of a BlockReader (a buffer: memoryview(block))."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class BlockReader:
    """Reads a file into reusable read-only blocks that Chunker.feed() slices without a
    copy; a block is rewritten only once nothing refers to it."""

    def __init__(self, size: int, keep: int = 6) -> None: ...
    def read(self, fd: int) -> Block | None:
        """The next block (size bytes, fewer only at end of file); None at end of file."""

class Chunker:
    """Streaming FastCDC 2020 chunker (native, GIL released while scanning)."""

    @property
    def params(self) -> ChunkerParams: ...
    def __init__(self, params: ChunkerParams, gear: Buffer) -> None: ...
    def feed(self, data: Buffer) -> list[memoryview]:
        """Add stream bytes; return the chunks they complete (final cut points)."""
    def finish(self) -> list[memoryview]:
        """End of stream: the final chunk if bytes are left; resets for a new stream."""
    def chunk_all(self, data: Buffer) -> list[memoryview]:
        """All chunks of data as one complete stream; leaves the fed stream alone."""
