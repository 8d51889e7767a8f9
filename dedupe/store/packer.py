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

from dedupe.crypto import EpochKeys, new_key, seal
from dedupe.format.pack import (
    MAX_PACK_SIZE,
    PACK_MAGIC,
    TRAILER_AAD,
    PackEntry,
    encode_footer,
    encode_trailer,
)


@dataclass
class FinishedPack:
    data: bytes
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
        self._parts: list[bytes] = [PACK_MAGIC]
        self._size = len(PACK_MAGIC)
        self._entries: list[PackEntry] = []

    def add(self, items: Sequence[tuple[bytes, bytes, int]]) -> list[FinishedPack]:
        """items: (chunk_id, blob plaintext, raw length). Seals each under the pack key."""
        if self._failed:
            raise RuntimeError("this PackWriter failed earlier") from self._failed
        done = []
        try:
            for chunk_id, plaintext, raw_length in items:
                blob = seal(self._key, plaintext, chunk_id)
                self._entries.append(PackEntry(chunk_id, self._size, len(blob), raw_length))
                self._parts.append(blob)
                self._size += len(blob)
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
        trailer = seal(self._key, encode_trailer(self._entries), TRAILER_AAD)
        wrapped = self.epoch.wrap(self._key)
        self._parts += [trailer, encode_footer(self.epoch.number, wrapped, len(trailer))]
        pack = FinishedPack(b"".join(self._parts), self._entries, self.epoch.number, wrapped)
        self._start()
        return pack
