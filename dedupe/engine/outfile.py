"""Write a restored stream into a file without copying it through the page cache.

A buffered write copies every byte into the kernel's page cache, and the final fsync then
writes those pages out; on a two-vCPU VM that copy alone was ~15% of a 1 GiB restore's CPU
(`copy_folio_from_iter_atomic`), and the restore was short of CPU, not of disk. With
O_DIRECT the device reads the bytes straight from our memory: the stream's pieces are
gathered into one page-aligned staging buffer (a memcpy in user space, several times
cheaper) and written in whole blocks. The last, partial block is written padded with
zeros and the file is then cut to its exact length.

Where O_DIRECT is refused (some file systems answer EINVAL, at open or at the first
write) the file is written the ordinary way, and the kernel is asked to start
writing back each range at once, so the final fsync has little left to do.

One writer per file, used from one thread at a time (restore hands it to a worker
thread window after window). Buffered writes, here and for a stream restored to a file
object (stdout, a pipe) or a tree's files, go through writev_all: a window's pieces in a
few system calls."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence

from dedupe.backends._direct import ALIGN, O_DIRECT, new_stage, pwrite_all, set_direct
from dedupe.crypto.aead import Buffer

STAGING = 4 * 1024 * 1024  # one write per 4 MiB: large for the device, small for RSS


IOV_MAX = 1024  # iovecs per writev (POSIX guarantees at least 16; Linux allows 1024)


def writev_all(fd: int, parts: Sequence[Buffer]) -> int:
    """Write every part whole, in order, with as few writev calls as the kernel allows
    (a pipe takes what fits and blocks for the rest); the number of bytes written."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    total = sum(len(v) for v in views)
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + IOV_MAX])
        while n and n >= len(views[i]):  # whole parts written
            n -= len(views[i])
            i += 1
        if n:  # a part written in part: the rest of it goes first next time
            views[i] = views[i][n:]
    return total


class OutputFile:
    """Appends to a new, empty file opened for writing, then makes it durable."""

    def __init__(self, fd: int, staging: int = STAGING) -> None:
        if staging <= 0 or staging % ALIGN:
            raise ValueError("staging must be a positive multiple of the page size")
        self.fd = fd
        self.written = 0  # bytes of the stream accepted so far
        self._buf: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._fill = 0  # bytes staged, not yet written
        self._flushed = 0  # file offset where the staged bytes belong
        self.in_place = 0  # bytes written with O_DIRECT from the caller's memory, uncopied
        self.refused = False  # O_DIRECT was taken at open and refused by a write
        if O_DIRECT and set_direct(fd, True):
            self._buf = new_stage(staging)
            self._view = memoryview(self._buf)

    @property
    def direct(self) -> bool:
        """True while the file is written with O_DIRECT."""
        return self._view is not None

    def write(self, parts: Sequence[Buffer], align: int = 0) -> int:
        """Append the parts; returns their total length. `align` (restore.Window.align),
        when a multiple of ALIGN, promises that the parts' memory lies at addresses
        congruent to their offsets in the stream modulo `align`: one part is then written
        with O_DIRECT where it lies, all but its first and last partial blocks, which go
        through the staging buffer."""
        n = sum(memoryview(part).nbytes for part in parts)
        if self._view is None:
            writev_all(self.fd, parts)
            _start_writeback(self.fd, self.written, n)
        elif align and align % ALIGN == 0 and len(parts) == 1 and n >= 2 * ALIGN:
            self._write_in_place(memoryview(parts[0]).cast("B"))
        else:
            self._stage(parts)
        self.written += n
        return n

    def _write_in_place(self, src: memoryview) -> None:
        # src starts at stream offset self.written, which is where the staged bytes end.
        head = -self.written % ALIGN  # up to the first block boundary: staged
        body_end = head + (len(src) - head) // ALIGN * ALIGN  # whole blocks: in place
        self._stage([src[:head]])
        if self._view is not None and self._fill:  # whole blocks now: written first
            self._write_staged(self._fill)
        if self._view is None:  # O_DIRECT was refused on the way: the rest goes buffered
            writev_all(self.fd, [src[head:]])
            return
        if body_end > head:
            if not self._write_direct(src[head:body_end]):
                writev_all(self.fd, [src[head:]])
                self.close()
                return
            self._flushed += body_end - head
            self.in_place += body_end - head
        self._stage([src[body_end:]])  # the last partial block: staged

    def _stage(self, parts: Sequence[Buffer]) -> None:
        for i, part in enumerate(parts):
            src = memoryview(part).cast("B")
            while src and self._view is not None:
                take = min(len(src), len(self._view) - self._fill)
                self._view[self._fill : self._fill + take] = src[:take]
                self._fill += take
                src = src[take:]
                if self._fill == len(self._view):
                    self._write_staged(self._fill)
            if self._view is None:  # O_DIRECT was refused: the rest goes buffered
                writev_all(self.fd, [src, *parts[i + 1 :]])
                return

    def finish(self) -> None:
        """Write what is staged and make the file durable (fsync)."""
        if self._view is not None and self._fill:
            tail = self._fill
            padded = -(-tail // ALIGN) * ALIGN
            self._view[tail:padded] = bytes(padded - tail)
            end = self._flushed + tail
            self._write_staged(padded)
            os.ftruncate(self.fd, end)
        os.fsync(self.fd)

    def close(self) -> None:
        """Release the staging buffer (the caller closes the descriptor)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._buf is not None:
            try:
                self._buf.close()
            except BufferError:
                pass  # a slice is still held by a traceback: freed with it
            self._buf = None

    def _write_direct(self, data: memoryview) -> bool:
        """Write `data` (whole blocks at an aligned address) at self._flushed with
        O_DIRECT. False when the file system took O_DIRECT at open but refuses it for
        writes (EINVAL): the descriptor is then switched to ordinary writes, positioned at
        self._flushed, and these bytes and all later ones go the ordinary way."""
        try:
            pwrite_all(self.fd, data, self._flushed)
            return True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.refused = True
            set_direct(self.fd, False)
            os.lseek(self.fd, self._flushed, os.SEEK_SET)
            return False

    def _write_staged(self, length: int) -> None:
        assert self._view is not None
        data = self._view[:length]
        try:
            direct = self._write_direct(data)
            if not direct:
                writev_all(self.fd, [data[: self._fill]])
        finally:
            data.release()  # the staging buffer cannot be closed while a slice exists
        self._flushed += self._fill
        self._fill = 0
        if not direct:
            self.close()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now (Linux: FADV_DONTNEED on
    dirty pages starts asynchronous writeback), so the final fsync has little left to do
    and the restored file does not fill the page cache."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        try:
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
