"""Writing a new file's bytes around the page cache (O_DIRECT), for the local backend.

Why: a backup writes packs once and does not read them back; written through the page
cache they evict the database's own working set on the host being backed up, and every
byte is copied into freshly allocated cache pages. That copy is cheap on bare metal
(~0.2 ns/B) but not everywhere: on a VM whose freed pages go back to the host, it was
measured at 0.3-9 CPU seconds per GB written, varying from one minute to the next
(bench/README.md, "Writing packs around the page cache"); direct writes cost 0.15 s
per GB there, every time.

How: the bytes are copied into a page-aligned staging buffer and written from it in
aligned blocks with O_DIRECT set on the descriptor; the last, unaligned piece is written
after O_DIRECT is cleared again. A file system that refuses direct I/O (fcntl or the first
write says EINVAL) gets the rest of the file written the ordinary way, and the caller is
told so that it stops trying. Durability is the caller's fsync, as before: O_DIRECT only
bypasses the cache, it does not make anything durable.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterable

from dedupe.backends.base import Buffer

# Offsets, lengths and the buffer address of a direct write are multiples of this. 4 KiB
# covers the logical block size of every common device; a stricter one is refused
# (EINVAL) and the write goes on without direct I/O.
ALIGN = 4096
STAGE_SIZE = 4 << 20
# Objects smaller than this are written the ordinary way: a key map or a lock is not
# worth a staging copy and two fcntl calls, and is read back soon.
DIRECT_MIN = 1 << 20

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_stages: list[mmap.mmap] = []
_stages_lock = threading.Lock()
_STAGES_KEPT = 2


def _take_stage() -> mmap.mmap:
    with _stages_lock:
        if _stages:
            return _stages.pop()
    return mmap.mmap(-1, STAGE_SIZE)  # anonymous: page-aligned


def _give_back(stage: mmap.mmap) -> None:
    with _stages_lock:
        if len(_stages) < _STAGES_KEPT:
            _stages.append(stage)
            return
    stage.close()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False if the file system refuses it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
    return offset


class _Writer:
    """Appends bytes to `fd` from offset 0, direct while it can be."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.direct = True
        self.refused = False  # the file system refused a direct write
        self.offset = 0

    def write(self, view: memoryview) -> None:
        """Write `view` at the current offset: directly while direct I/O is on (the
        caller passes the staging buffer, cut to a multiple of ALIGN, then)."""
        if self.direct:
            try:
                # A short direct write (a full disk) ends on a block boundary: the loop
                # writes the rest or raises ENOSPC.
                self.offset = _pwrite_all(self.fd, view, self.offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Refused after all (a device with larger blocks): nothing of this piece
                # was written. The rest of the file goes the ordinary way.
                self.refused = True
                self.buffered()
        self.offset = _pwrite_all(self.fd, view, self.offset)

    def buffered(self) -> None:
        if self.direct:
            self.direct = False
            _set_direct(self.fd, False)


def write_parts(fd: int, parts: Iterable[Buffer], direct: bool) -> bool:
    """Write `parts` back to back into the empty file open for writing at `fd`, around the
    page cache if `direct` and the file system allows it. Returns False when direct I/O
    was asked for and the file system refused it (the caller should stop asking); the
    bytes are written either way. The caller fsyncs."""
    if not direct:
        _write_buffered(fd, parts)
        return True
    if not _O_DIRECT or not _set_direct(fd, True):
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
                    writer.write(staged)
                    filled = 0
        aligned = filled - filled % ALIGN
        if aligned:
            writer.write(staged[:aligned])
        if filled > aligned:  # the unaligned end: written through the cache
            writer.buffered()
            writer.write(staged[aligned:filled])
    finally:
        staged.release()
        _give_back(stage)
    return not writer.refused


def _write_buffered(fd: int, parts: Iterable[Buffer]) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            view = view[os.write(fd, view) :]
