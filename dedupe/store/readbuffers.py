"""Reusable buffers for reading pack ranges (restore, verify).

A fresh `bytes` per read makes the kernel fault in, and zero, every 4 KiB page of it
before the read's own copy; on the virtual machines we measure, that costs more CPU than
the copy. Restore and verify read hundreds of megabytes of packs, in ranges of up to a
pack, a few at a time: each range in flight takes a buffer here for as long as it needs
the bytes, and the next range reads into the same memory.

A buffer is handed out again only once nothing refers to it: if a caller still holds a
view when its block ends (an executor job that outlived a cancelled task, say), the
buffer is dropped, not reused, so no one ever sees its bytes change under them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ReadBuffers:
    """At most `count` buffers, each lent to one reader at a time (waiting for one to come
    back when all are out). One per operation, from one event loop: the buffers go when
    it does."""

    def __init__(self, count: int) -> None:
        if count <= 0:
            raise ValueError("ReadBuffers: count must be positive")
        self._slots = asyncio.Semaphore(count)
        self._free: list[bytearray] = []

    @asynccontextmanager
    async def take(self, size: int) -> AsyncIterator[memoryview]:
        """A writable view of exactly `size` bytes, valid until the block ends."""
        async with self._slots:
            buf = self._free.pop() if self._free else bytearray()
            if len(buf) < size:
                # Headroom, as range sizes vary from read to read.
                buf = bytearray(size + (size >> 3))
            view = memoryview(buf)[:size]
            try:
                yield view
            finally:
                try:
                    view.release()
                    # References now: `buf` and getrefcount's argument. More means a
                    # view of it is still alive somewhere.
                    reusable = sys.getrefcount(buf) == 2
                except BufferError:  # native code still holds the view
                    reusable = False
                if reusable:
                    self._free.append(buf)
