"""Writing a new file's bytes around the page cache (O_DIRECT): the primitives (turning
O_DIRECT on and off, whole positioned writes, private page-aligned staging buffers),
shared with the restore's output file (dedupe.engine.outfile), and write_parts, the
local backend's writer of objects.

Why: a backup writes packs once and does not read them back; written through the page
cache they evict the database's own working set on the host being backed up, and every
byte is copied into freshly allocated cache pages. That copy is usually cheap, but not
everywhere: on a VM whose freed pages go back to the host, it was
measured at 0.3-9 CPU seconds per GB written, varying from one minute to the next
(bench/README.md, "Writing packs around the page cache"); direct writes cost 0.15 s
per GB there, every time.

How: the bytes are copied into a page-aligned staging buffer (private, at most two kept
per process, none inherited by a forked child) and written from it in aligned blocks with
O_DIRECT set on the descriptor; the last, unaligned piece is written after O_DIRECT is
cleared again. Direct I/O is turned on only once an object has come to DIRECT_MIN bytes,
so a short stream of parts (a small manifest) is written the ordinary way. A file system
that refuses direct I/O (fcntl or a write says EINVAL) gets the rest of the file written
the ordinary way, and the caller is told so that it stops trying. Durability is the
caller's fsync, as before: O_DIRECT only bypasses the cache, it makes nothing durable.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterable

from dedupe.backends.base import Buffer

# Offsets, lengths and the buffer address of a direct write are multiples of this: the
# device's logical block size is 512 or 4096 bytes, and a page is a multiple of both; a
# stricter one is refused (EINVAL) and the write goes on without direct I/O.
ALIGN = mmap.PAGESIZE
# One direct write per MiB: large enough for the device, and 3 MiB less at a backup's
# memory peak than the 4 MiB it was (stop 37; no cost measured on a 1 GiB new backup).
STAGE_SIZE = 1 << 20
# Objects smaller than this are written the ordinary way: a key map or a lock is not
# worth a staging copy and two fcntl calls, and is read back soon.
DIRECT_MIN = 1 << 20

O_DIRECT = getattr(os, "O_DIRECT", 0)
_stages: list[mmap.mmap] = []
_stages_lock = threading.Lock()
_STAGES_KEPT = 2


def new_stage(size: int) -> mmap.mmap:
    """A staging buffer: anonymous, so page-aligned; private, so that a forked child
    (multiprocessing's default on Linux) writing files of its own never shares the
    bytes being written."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def _take_stage() -> mmap.mmap:
    with _stages_lock:
        if _stages:
            return _stages.pop()
    return new_stage(STAGE_SIZE)


def _give_back(stage: mmap.mmap) -> None:
    with _stages_lock:
        if len(_stages) < _STAGES_KEPT:
            _stages.append(stage)
            return
    stage.close()


def _forget_stages() -> None:
    """In a forked child: the parent's buffers are copies it does not need."""
    global _stages_lock
    _stages.clear()
    _stages_lock = threading.Lock()  # the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_stages)


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False if the file system refuses it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | O_DIRECT) if on else (flags & ~O_DIRECT))
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True


def pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    """Write all of `view` at `offset`; the offset after it."""
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # never for a regular file; do not spin if it happens
            raise OSError(errno.EIO, "a write wrote nothing")
        view = view[n:]
        offset += n
    return offset


class _Writer:
    """Appends bytes to `fd` from offset 0: the ordinary way until `go_direct`, then
    directly while the file system allows it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.direct = False
        self.refused = False  # the file system refused direct I/O
        self.offset = 0

    def go_direct(self) -> None:
        if not self.refused and not self.direct:
            self.direct = set_direct(self.fd, True)
            self.refused = not self.direct

    def write(self, view: memoryview) -> None:
        """Write `view` at the current offset: directly while direct I/O is on (the
        caller passes the staging buffer, cut to a multiple of ALIGN, then)."""
        if self.direct:
            try:
                # A short direct write (a full disk) ends on a block boundary: the loop
                # writes the rest or raises ENOSPC.
                self.offset = pwrite_all(self.fd, view, self.offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Refused after all (a device with larger blocks): nothing of this piece
                # was written. The rest of the file goes the ordinary way.
                self.refused = True
                self.buffered()
        self.offset = pwrite_all(self.fd, view, self.offset)

    def buffered(self) -> None:
        if self.direct:
            self.direct = False
            set_direct(self.fd, False)


def write_parts(fd: int, parts: Iterable[Buffer], direct: bool) -> bool:
    """Write `parts` back to back into the empty file open for writing at `fd`, around the
    page cache if `direct`, the file system allows it and they come to DIRECT_MIN bytes
    or more (a stream of parts that ends sooner is written the ordinary way). Returns
    False when the file system refused direct I/O (the caller should stop asking); the
    bytes are written either way. The caller fsyncs."""
    if not direct:
        _write_buffered(fd, parts)
        return True
    if not O_DIRECT:
        _write_buffered(fd, parts)
        return False
    writer = _Writer(fd)
    stage = _take_stage()
    staged = memoryview(stage)
    try:
        filled = 0
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                k = min(len(view), STAGE_SIZE - filled)
                staged[filled : filled + k] = view[:k]
                filled += k
                view = view[k:]
                if filled == STAGE_SIZE:
                    writer.go_direct()
                    writer.write(staged)
                    filled = 0
        if writer.offset + filled >= DIRECT_MIN:
            writer.go_direct()
        aligned = filled - filled % ALIGN if writer.direct else 0
        if aligned:
            writer.write(staged[:aligned])
        if filled > aligned:  # the unaligned end, or a small object: through the cache
            writer.buffered()
            writer.write(staged[aligned:filled])
    except BaseException:
        # A slice of the buffer may live on in the traceback: drop the buffer (the
        # garbage collector unmaps it) rather than close it or hand it out again.
        staged.release()
        raise
    staged.release()
    _give_back(stage)
    return not writer.refused


def _write_buffered(fd: int, parts: Iterable[Buffer]) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "a write wrote nothing")
            view = view[n:]
