"""PackWriter: seals framed chunks into packs of about `target_size` bytes.

Contract: one owner calls `add()` (or `fill()`) and `flush()`, one call at a time (they may run on a
worker thread; there is no internal locking). Each pack gets a fresh random data key,
handed out with the finished pack: its writer wraps it into a key map (no key is in the
pack's bytes). `add()` returns the packs it completed, `fill()` stops at each;
`flush()` is the barrier that completes the last, partly filled pack. A PackWriter that
raised stays failed: later calls raise too, so a half-built pack is never written.

Whoever wrote a finished pack may hand it back with `recycle()` (from any thread): its
buffer then holds the next pack. A fresh 16 MiB buffer costs ~4,000 page faults.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from dedupe.crypto import OVERHEAD, new_key
from dedupe.crypto.aead import seal_into
from dedupe.format.pack import (
    FOOTER_SIZE,
    MAX_PACK_SIZE,
    PACK_MAGIC,
    TRAILER_AAD,
    TRAILER_RECORD,
    encode_footer,
    encode_trailer_records,
)
from dedupe.store.blobs import FramedBatch, seal_batch

_RECORD = struct.Struct(TRAILER_RECORD)
_SPARE_BUFFERS = 1
# Room past the target size in a pack buffer: the blob that crosses the target (at most a
# max-size chunk, stored raw, and its overhead) and the trailer. The trailer takes
# TRAILER_RECORD (44 bytes) per blob: ~80 KiB for 16 MiB of 9 KiB blobs, and target/32
# holds it for blobs of 1.4 KiB on average. Packs of smaller blobs grow their buffer.
_BLOB_ROOM = 64 * 1024 + 1024


def _buffer_size(target: int) -> int:
    return target + _BLOB_ROOM + target // 32


@dataclass
class FinishedPack:
    data: bytearray
    records: bytes  # its trailer entries, back to back (format.pack.TRAILER_RECORD)
    key: bytes  # its data key, to be wrapped in a key map

    def entries(self) -> Iterator[tuple[bytes, int, int, int]]:
        """(chunk id, offset, stored length, raw length) of every blob, in pack order."""
        return _RECORD.iter_unpack(self.records)


class PackWriter:
    def __init__(self, target_size: int) -> None:
        if not 1024 <= target_size < MAX_PACK_SIZE // 2:
            raise ValueError(f"pack size {target_size} out of range")
        self.target_size = target_size
        self._failed: BaseException | None = None
        self._spares: deque[bytearray] = deque()  # append and pop are atomic
        # The pack being filled; None between a finished pack and the next blob, so that
        # a writer holding finished packs does not also hold an empty buffer.
        self._buf: bytearray | None = None
        self._records = bytearray()

    def recycle(self, pack: FinishedPack) -> None:
        """Reuse `pack`'s buffer for a later pack. Nothing may use pack.data afterwards."""
        if len(self._spares) < _SPARE_BUFFERS:
            self._spares.append(pack.data)
        pack.data = bytearray()

    def _start(self) -> bytearray:
        self._key = new_key()
        # Blobs are sealed in place into one buffer: no per-blob copies, no final join.
        size = _buffer_size(self.target_size)
        try:
            buf = self._spares.pop()
            if len(buf) < size:
                buf.extend(bytes(size - len(buf)))
        except IndexError:
            buf = bytearray(size)
        buf[: len(PACK_MAGIC)] = PACK_MAGIC
        self._buf = buf
        self._size = len(PACK_MAGIC)
        self._records = bytearray()
        return buf

    def _reserve(self, buf: bytearray, n: int) -> None:
        # Rare (packs of many small blobs): grow by a little, as every byte added is
        # written (zeroed) and so resident, in each buffer this writer keeps.
        if self._size + n > len(buf):
            buf.extend(bytes(max(n, len(buf) // 16)))

    def add(self, batch: FramedBatch) -> list[FinishedPack]:
        """Seal a framed batch (BlobCodec.frame) under the pack key; returns the packs it
        completed."""
        if self._failed:
            raise RuntimeError("this PackWriter failed earlier") from self._failed
        done = []
        while batch.pending:
            pack = self.fill(batch)
            if pack is not None:
                done.append(pack)
        return done

    def fill(self, batch: FramedBatch) -> FinishedPack | None:
        """Seal blobs of `batch` until a pack is complete (returned, with the rest of the
        batch still pending) or the batch is all sealed (None). A caller that hands each
        pack on before it calls again holds one pack buffer besides those handed on."""
        if self._failed:
            raise RuntimeError("this PackWriter failed earlier") from self._failed
        try:
            while batch.pending:
                buf = self._start() if self._buf is None else self._buf
                self._size = seal_batch(
                    self._key, batch, buf, self._size, self.target_size, self._records
                )
                if self._size >= self.target_size:
                    return self._finish(buf)
                if batch.pending:  # the next blob does not fit: make room
                    self._reserve(buf, batch.next_sealed_size())
        except BaseException as e:
            self._failed = e
            raise
        return None

    def flush(self) -> FinishedPack | None:
        if self._failed:
            raise RuntimeError("this PackWriter failed earlier") from self._failed
        return self._finish(self._buf) if self._buf is not None and self._records else None

    def _finish(self, buf: bytearray) -> FinishedPack:
        trailer = encode_trailer_records(self._records)
        self._reserve(buf, len(trailer) + OVERHEAD + FOOTER_SIZE)
        trailer_start = self._size
        self._size = seal_into(self._key, trailer, TRAILER_AAD, buf, trailer_start)
        footer = encode_footer(self._size - trailer_start)
        buf[self._size : self._size + FOOTER_SIZE] = footer
        self._size += FOOTER_SIZE
        del buf[self._size :]
        pack = FinishedPack(buf, bytes(self._records), self._key)
        # The next pack's buffer is taken when its first blob comes (a recycled one by
        # then, if its writer is done with one), not now.
        self._buf = None
        self._records = bytearray()
        return pack
