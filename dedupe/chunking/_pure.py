"""Pure-Python FastCDC 2020: the executable spec of the C kernel (csrc/fastcdc.c).

Plain and obvious, one byte at a time, and about a hundred times slower than the kernel.
Tests demand that both give identical cut points; the engine always uses the native one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .gear import gear_values
from .params import ChunkerParams

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

_U64 = (1 << 64) - 1


class PyChunker:
    """Streaming FastCDC chunker with the same interface and cut points as `Chunker`."""

    def __init__(self, params: ChunkerParams, gear: bytes) -> None:
        self.params = params
        self._gear = gear_values(gear)
        self._mask_s = params.mask_s
        self._mask_l = params.mask_l
        self._chunk = bytearray()  # bytes of the chunk in progress
        self._fp = 0

    def feed(self, data: Buffer) -> list[memoryview]:
        """Add bytes of the stream; return the chunks they complete."""
        min_size = self.params.min_size
        avg_size = self.params.avg_size
        max_size = self.params.max_size
        gear = self._gear
        out: list[memoryview] = []
        for byte in memoryview(data).cast("B"):
            self._chunk.append(byte)
            i = len(self._chunk) - 1  # index of this byte within its chunk
            if i < min_size:
                continue  # cut-point skipping: the first min_size bytes are not hashed
            self._fp = ((self._fp << 1) + gear[byte]) & _U64
            mask = self._mask_s if i < avg_size else self._mask_l
            if self._fp & mask == 0 or len(self._chunk) == max_size:
                out.append(self._emit())
        return out

    def finish(self) -> list[memoryview]:
        """End of stream: the final chunk, if any bytes are left. Resets for a new stream."""
        return [self._emit()] if self._chunk else []

    def chunk_all(self, data: Buffer) -> list[memoryview]:
        """All chunks of `data` as one complete stream (leaves this chunker's stream alone)."""
        other = PyChunker.__new__(PyChunker)
        other.params, other._gear = self.params, self._gear
        other._mask_s, other._mask_l = self._mask_s, self._mask_l
        other._chunk, other._fp = bytearray(), 0
        return other.feed(data) + other.finish()

    def _emit(self) -> memoryview:
        chunk = memoryview(bytes(self._chunk))
        self._chunk = bytearray()
        self._fp = 0
        return chunk
