"""Types of the native FastCDC extension (built from _fastcdc.pyx + csrc/fastcdc.c)."""

from typing_extensions import Buffer

from .params import ChunkerParams

class Block:
    """A read-only block of a BlockReader or MapReader (a buffer: memoryview(block))."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def reader(self) -> MapReader | None:
        """The MapReader whose mapped window this is; None for any other block."""

class BlockReader:
    """Reads a file into reusable read-only blocks that Chunker.feed() slices without a
    copy; a block is rewritten only once nothing refers to it."""

    def __init__(self, size: int, keep: int = 6) -> None: ...
    def read(self, fd: int) -> Block | None:
        """The next block (size bytes, fewer only at end of file); None at end of file."""

class MapReader:
    """Reads a regular file as read-only mapped windows (no copy into the process). If
    the file shrinks under a window in use, its lost bytes read as zeros and `torn` turns
    true: what was read must then be discarded. Reads from offset 0."""

    def __init__(self, size: int) -> None: ...
    @property
    def torn(self) -> bool: ...
    def read(self, fd: int) -> Block | None:
        """The next window (size bytes, fewer only at end of file); None at end of file."""

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
