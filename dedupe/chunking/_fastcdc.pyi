"""Types of the native FastCDC extension (built from _fastcdc.pyx + csrc/fastcdc.c)."""

from typing_extensions import Buffer

from .params import ChunkerParams

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
