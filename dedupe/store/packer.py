"""PackWriter: seals framed chunks into packs of about `target_size` bytes.

Contract: one owner calls `add()` and `flush()`, one call at a time (they may run on a
worker thread; there is no internal locking). Each pack gets a fresh random data key,
wrapped for the epoch given at construction. `add()` returns the packs it completed;
`flush()` is the barrier that completes the last, partly filled pack. A PackWriter that
raised stays failed: later calls raise too, so a half-built pack is never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dedupe.crypto import OVERHEAD, EpochKeys, new_key
from dedupe.crypto.aead import seal_into
from dedupe.format.pack import (
    FOOTER_SIZE,
    MAX_PACK_SIZE,
    PACK_MAGIC,
    TRAILER_AAD,
    PackEntry,
    encode_footer,
    encode_trailer,
)


@dataclass
class FinishedPack:
    data: bytearray
    entries: list[PackEntry]
    epoch: int
    wrapped_key: bytes


class PackWriter:
    def __init__(self, epoch: EpochKeys, target_size: int) -> None:
        if not 1024 <= target_size < MAX_PACK_SIZE // 2:
            raise ValueError(f"pack size {target_size} out of range")
        self.epoch = epoch
        self.target_size = target_size
        self._failed: BaseException | None = None
        self._start()

    def _start(self) -> None:
        self._key = new_key()
        # Blobs are sealed in place into one buffer: no per-blob copies, no final join.
        self._buf = bytearray(self.target_size + 64 * 1024)
        self._buf[: len(PACK_MAGIC)] = PACK_MAGIC
        self._size = len(PACK_MAGIC)
        self._entries: list[PackEntry] = []

    def _reserve(self, n: int) -> None:
        if self._size + n > len(self._buf):
            self._buf.extend(bytes(max(n, len(self._buf) // 2)))

    def add(self, items: Sequence[tuple[bytes, bytes, int]]) -> list[FinishedPack]:
        """items: (chunk_id, blob plaintext, raw length). Seals each under the pack key."""
        if self._failed:
            raise RuntimeError("this PackWriter failed earlier") from self._failed
        done = []
        try:
            for chunk_id, plaintext, raw_length in items:
                self._reserve(len(plaintext) + OVERHEAD)
                start = self._size
                self._size = seal_into(self._key, plaintext, chunk_id, self._buf, start)
                self._entries.append(PackEntry(chunk_id, start, self._size - start, raw_length))
                if self._size >= self.target_size:
                    done.append(self._finish())
        except BaseException as e:
            self._failed = e
            raise
        return done

    def flush(self) -> FinishedPack | None:
        if self._failed:
            raise RuntimeError("this PackWriter failed earlier") from self._failed
        return self._finish() if self._entries else None

    def _finish(self) -> FinishedPack:
        trailer = encode_trailer(self._entries)
        self._reserve(len(trailer) + OVERHEAD + FOOTER_SIZE)
        trailer_start = self._size
        self._size = seal_into(self._key, trailer, TRAILER_AAD, self._buf, trailer_start)
        wrapped = self.epoch.wrap(self._key)
        footer = encode_footer(self.epoch.number, wrapped, self._size - trailer_start)
        self._buf[self._size : self._size + FOOTER_SIZE] = footer
        self._size += FOOTER_SIZE
        del self._buf[self._size :]
        pack = FinishedPack(self._buf, self._entries, self.epoch.number, wrapped)
        self._start()
        return pack
