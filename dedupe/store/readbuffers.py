"""Reusable buffers for reading pack ranges (restore, verify).

A fresh `bytes` per read makes the kernel fault in, and zero, every 4 KiB page of it
before the read's own copy; on the virtual machines we measure, that costs more CPU than
the copy. Restore and verify read hundreds of megabytes of packs, in ranges of up to a
pack, a few at a time: each range in flight takes a buffer here for as long as it needs
the bytes, and the next range reads into the same memory.

The pool holds at most `budget` bytes: the capacities of the buffers lent out plus those
kept for reuse. A count alone let each of its buffers grow to the largest range it served
(6 x 9 MiB in the worst case for restore), and that memory is a large part of the peak
RSS of restore and verify; the budget bounds it whatever the ranges are. A take that does
not fit waits until enough comes back, in arrival order. One exception keeps every read
possible: a take larger than the whole budget is granted once nothing else is lent (the
pool then holds that one buffer, without headroom), and the buffer is let go when it
comes back.

A buffer is handed out again only once nothing refers to it: if a caller still holds a
view when its block ends (an executor job that outlived a cancelled task, say), the
buffer is dropped, not reused, so no one ever sees its bytes change under them. The pool
stops counting a dropped buffer then (it no longer holds it): its memory lives on, outside
the budget, until the holder lets go of it.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Waiter:
    """A take waiting for room; `buf` is set when it is granted (before `future`)."""

    __slots__ = ("buf", "future", "size")

    def __init__(self, size: int, future: asyncio.Future[None]) -> None:
        self.size = size
        self.future = future
        self.buf: bytearray | None = None


class ReadBuffers:
    """At most `count` buffers and `budget` bytes of them, each buffer lent to one reader
    at a time, takes waiting (first come, first served) while either limit is reached.
    One per operation, from one event loop: the buffers go when it does.

    The budget bounds the memory the pool holds, lent or kept: it is what restore and
    verify add to their peak RSS for the ranges in flight. Kept buffers never make a take
    wait: those it cannot use are dropped, as few as need be, to make room for it. A
    buffer gets 1/8 headroom over the size it was made for (range sizes vary from read to
    read) when, and only as far as, the budget has room for it. A reader takes one buffer
    at a time (one that waits for a second while holding one may wait forever)."""

    def __init__(self, count: int, budget: int) -> None:
        if count <= 0:
            raise ValueError("ReadBuffers: count must be positive")
        if budget <= 0:
            raise ValueError("ReadBuffers: budget must be positive")
        self._count = count
        self._budget = budget
        self._free: list[bytearray] = []  # kept for reuse
        self._free_bytes = 0
        self._lent = 0
        self._lent_bytes = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def held(self) -> int:
        """Bytes the pool holds now: capacities of the buffers lent out and kept. At most
        the budget, except while a take larger than the budget is out (alone)."""
        return self._lent_bytes + self._free_bytes

    @property
    def lent(self) -> int:
        """Buffers lent out now."""
        return self._lent

    @asynccontextmanager
    async def take(self, size: int) -> AsyncIterator[memoryview]:
        """A writable view of exactly `size` bytes, valid until the block ends."""
        if size < 0:
            raise ValueError("ReadBuffers: size must not be negative")
        buf = None if self._waiters else self._grant(size)
        if buf is None:
            buf = await self._wait(size)
        view = memoryview(buf)[:size]
        try:
            yield view
        finally:
            try:
                view.release()
                # References now: `buf` and getrefcount's argument. More means a view of
                # it is still alive somewhere.
                reusable = sys.getrefcount(buf) == 2
            except BufferError:  # native code still holds the view
                reusable = False
            self._give_back(buf, reusable)

    async def _wait(self, size: int) -> bytearray:
        waiter = _Waiter(size, asyncio.get_running_loop().create_future())
        # Granted by _wake, in arrival order, when buffers come back or takes ahead of it
        # are cancelled.
        self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            buf, waiter.buf = waiter.buf, None
            if buf is not None:  # granted, then cancelled before it could resume
                self._give_back(buf, True)
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
                self._wake()  # the takes behind it may fit now
            raise
        buf, waiter.buf = waiter.buf, None
        assert buf is not None
        return buf

    def _grant(self, size: int) -> bytearray | None:
        """A buffer of at least `size` bytes, counted as lent; None if it must wait."""
        if self._lent >= self._count:
            return None
        # The smallest kept buffer that is large enough, by index (bytearrays compare by
        # content: list.remove could take out another one).
        best = -1
        for i, kept in enumerate(self._free):
            if len(kept) >= size and (best < 0 or len(kept) < len(self._free[best])):
                best = i
        if best >= 0:
            buf = self._free.pop(best)
            self._free_bytes -= len(buf)
        else:
            if self._lent and self._lent_bytes + size > self._budget:
                return None
            # Make room, dropping the smallest kept buffers first: for the budget, and to
            # keep at most `count` buffers (lent and kept) in all.
            self._free.sort(key=len, reverse=True)
            while self._free and (
                self._lent_bytes + self._free_bytes + size > self._budget
                or self._lent + len(self._free) >= self._count
            ):
                self._free_bytes -= len(self._free.pop())
            room = self._budget - self._lent_bytes - self._free_bytes - size
            buf = bytearray(size + max(0, min(size >> 3, room)))
        self._lent += 1
        self._lent_bytes += len(buf)
        return buf

    def _give_back(self, buf: bytearray, reusable: bool) -> None:
        self._lent -= 1
        self._lent_bytes -= len(buf)
        # A take larger than the budget does not keep its buffer once it is done.
        if reusable and self.held + len(buf) <= self._budget:
            self._free.append(buf)
            self._free_bytes += len(buf)
        self._wake()

    def _wake(self) -> None:
        """Grant waiting takes in arrival order, as far as they fit: one that does not fit
        holds back those behind it (however small), so that it is not starved."""
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():  # cancelled (its task will find it gone)
                self._waiters.popleft()
                continue
            try:
                buf = self._grant(waiter.size)
            except Exception as e:  # MemoryError: the waiting take raises it, not us
                self._waiters.popleft()
                waiter.future.set_exception(e)
                continue
            if buf is None:
                return
            self._waiters.popleft()
            waiter.buf = buf
            waiter.future.set_result(None)
