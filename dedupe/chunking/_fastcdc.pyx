# cython: language_level=3
"""Thin wrapper over csrc/fastcdc.c: owns the buffers, calls the kernel once per buffer
without the GIL, and returns memoryview slices. Contracts are in csrc/fastcdc.h; the
Python-visible API is typed in _fastcdc.pyi.

feed() keeps the cut state of the chunk in progress (ddp_cdc_state), so no byte is hashed
twice however the stream is split. bytes input is sliced in place: only the chunk that
straddles the pending bytes and the new data (at most max_size bytes) is copied into a
small joint buffer, scanned with a one-entry output, and the rest of the input is scanned
in one kernel call. A chunker is not safe to feed from two threads at once."""

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.ref cimport Py_REFCNT
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from posix.stdlib cimport posix_memalign
from libc.string cimport memcpy
from posix.unistd cimport read
from posix.stat cimport S_ISREG, fstat, struct_stat
from posix.types cimport off_t
from posix.unistd cimport pread

import os


cdef extern from "mapread.h" nogil:
    int ddp_map_install()
    void *ddp_map_window(int fd, uint64_t offset, size_t len, int *torn, int *err)
    void ddp_map_release(void *addr, size_t len)
    size_t ddp_map_page_size()


cdef extern from "fastcdc.h" nogil:
    ctypedef struct ddp_cdc_config:
        size_t min_size
        size_t avg_size
        size_t max_size
    ctypedef struct ddp_cdc_state:
        size_t pos
        uint64_t fp
    int DDP_CDC_OK
    unsigned DDP_CDC_GEAR_BYTES
    int ddp_cdc_init(ddp_cdc_config *cfg, const uint8_t *gear_le, size_t min_size,
                     size_t avg_size, size_t max_size, unsigned normalization)
    void ddp_cdc_state_reset(ddp_cdc_state *st)
    size_t ddp_cdc_scan(const ddp_cdc_config *cfg, ddp_cdc_state *st, const uint8_t *buf,
                        size_t len, int eof, size_t *ends, size_t cap)
    size_t ddp_cdc_max_chunks(const ddp_cdc_config *cfg, size_t len)


cdef bytes _EMPTY = b""
cdef Py_ssize_t _POOL_MAX = 4  # blocks a Chunker keeps for reuse between feed() calls


cdef class _Block:
    """Read-only memory that chunks (memoryview slices) refer to: a Chunker's copy of one
    feed() of a mutable buffer, a BlockReader's block, or chunks opened by the blob codec
    (dedupe.store._blobcodec). Its pool reuses a block only when nothing else refers to
    it (no chunk, no memoryview, no .obj holder), so no one can see its bytes change.
    Reusing warm memory instead of a fresh allocation avoids page-faulting a few MiB of
    new pages per use, which costs more than the copy itself. Fields: _fastcdc.pxd."""

    def __dealloc__(self):
        if self.map_len:
            ddp_map_release(self.data, self.map_len)
        else:
            free(self.data)

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("chunks are read-only")
        PyBuffer_FillInfo(view, self, self.data, self.size, 1, flags)

    def __len__(self):
        return self.size


Block = _Block  # the public name of a BlockReader's blocks


cdef char *_alloc(Py_ssize_t size, size_t align) noexcept:
    """size bytes (at least 1) from malloc, or at an address that is a multiple of
    `align` (a power of two, a multiple of sizeof(void *)) when it is not 0; NULL if
    memory runs out. Either is released with free()."""
    cdef void *p = NULL
    if size <= 0:
        size = 1
    if align == 0:
        return <char *>malloc(size)
    if posix_memalign(&p, align, <size_t>size) != 0:
        return NULL
    return <char *>p


cdef _Block _new_block(Py_ssize_t size, size_t align=0):
    cdef _Block b = _Block.__new__(_Block)
    b.data = _alloc(size, align)
    if b.data == NULL:
        raise MemoryError()
    b.cap = size
    b.size = 0
    return b


cdef _Block _free_block(list pool, Py_ssize_t size, Py_ssize_t keep, size_t align=0):
    """A block of at least size bytes from `pool` that no one but the pool refers to, or a
    new one (added to the pool while it holds fewer than `keep`). The caller sets .size
    and overwrites the contents. `align`: the block starts at a multiple of it (0: as
    malloc returns it); a pool's blocks are all taken with the same `align`."""
    cdef _Block b
    cdef _Block small = None
    cdef char *fresh
    cdef Py_ssize_t cap
    for b in pool:
        # References: the pool's and the loop variable's. More means a chunk, a
        # memoryview, a pending stream or a hash still in progress uses it.
        if Py_REFCNT(b) == 2:
            if b.cap >= size:
                return b
            if small is None:
                small = b
    if small is not None:
        # Grow a free block that is too small, with headroom so that sizes that vary from
        # call to call do not grow it again and again. Its bytes are about to be
        # overwritten: free and allocate rather than realloc, which would copy them.
        cap = size + (size >> 3)
        fresh = _alloc(cap, align)
        if fresh == NULL:
            raise MemoryError()
        free(small.data)
        small.data = fresh
        small.cap = cap
        return small
    b = _new_block(size, align)
    if len(pool) < keep:
        pool.append(b)
    # else: a transient block, freed once unreferenced; the pooled ones stay, as they
    # are the oldest in use and so the first to come free
    return b


cdef Py_ssize_t _read_full(int fd, char *dst, Py_ssize_t want, off_t offset) except -1:
    """Read up to `want` bytes into dst, short only at end of file: from the descriptor's
    position if offset < 0, else from offset (pread). The GIL is released while reading;
    raises OSError as os.read would."""
    cdef Py_ssize_t got = 0, n = 0
    cdef int err = 0
    with nogil:
        while got < want:
            if offset < 0:
                n = read(fd, dst + got, <size_t>(want - got))
            else:
                n = pread(fd, dst + got, <size_t>(want - got), offset + got)
            if n < 0:
                if errno == EINTR:
                    continue
                err = errno
                break
            if n == 0:
                break
            got += n
    if err:
        raise OSError(err, os.strerror(err))
    return got


cdef class BlockReader:
    """Reads a file into read-only blocks that Chunker.feed() slices without a copy.

    A block is written again only once nothing refers to it any more (no chunk, no
    memoryview, no hash in progress), so every chunk sees its bytes unchanged for as long
    as it lives. Reusing blocks avoids a page fault per 4 KiB page of every read, which
    costs more than the read's own copy. Use from one thread at a time."""

    cdef list _pool
    cdef Py_ssize_t _size
    cdef Py_ssize_t _keep

    def __init__(self, Py_ssize_t size, Py_ssize_t keep=6):
        if size <= 0 or keep <= 0:
            raise ValueError("BlockReader: size and keep must be positive")
        self._pool = []
        self._size = size
        self._keep = keep

    def read(self, int fd):
        """The next block of fd: `size` bytes, fewer only at end of file; None at end of
        file. Raises OSError as os.read would. The GIL is released while reading."""
        cdef _Block b = _free_block(self._pool, self._size, self._keep)
        cdef Py_ssize_t got = _read_full(fd, b.data, self._size, -1)
        if got == 0:
            return None
        b.size = got
        return b


cdef class MapReader:
    """Reads a regular file as read-only mapped windows (csrc/mapread.h): the chunker and
    the hashes read the page cache's own pages, so no byte is copied into the process.

    A window is unmapped once nothing refers to it (no chunk, no memoryview, no hash in
    progress), like a BlockReader block. Should the file shrink while one of its windows
    is in use, the bytes cut off read as zeros instead of killing the process with SIGBUS,
    and `torn` turns true for good: whatever was read must then be discarded. A window
    that cannot be mapped (no free slot, a file system without mmap) is read with pread
    instead. Reads from offset 0 and ignores the descriptor's position; use from one
    thread at a time."""

    cdef Py_ssize_t _size
    cdef uint64_t _off
    cdef int _torn  # written by the SIGBUS handler (csrc/mapread.c) of any thread

    def __init__(self, Py_ssize_t size):
        if size <= 0 or size % <Py_ssize_t>ddp_map_page_size():
            raise ValueError("MapReader: size must be a positive multiple of the page size")
        cdef int err = ddp_map_install()
        if err:
            raise OSError(err, os.strerror(err))
        self._size = size
        self._off = 0
        self._torn = 0

    @property
    def torn(self):
        """True once bytes of a window were found cut off the end of the file."""
        return self._torn != 0

    def read(self, int fd):
        """The next window of fd: `size` bytes, fewer only at the end of the file (its
        size now); None at the end. Raises OSError as os.pread would."""
        cdef struct_stat st
        cdef void *addr
        cdef size_t n
        cdef int err = 0
        if fstat(fd, &st) != 0:
            err = errno
            raise OSError(err, os.strerror(err))
        if not S_ISREG(st.st_mode):
            raise ValueError("MapReader reads regular files only")
        if <uint64_t>st.st_size <= self._off:
            return None
        n = <size_t>self._size
        if <uint64_t>st.st_size - self._off < n:
            n = <size_t>(<uint64_t>st.st_size - self._off)
        with nogil:
            addr = ddp_map_window(fd, self._off, n, &self._torn, &err)
        cdef _Block b
        if addr == NULL:
            b = self._read_copy(fd, n)
        else:
            b = _Block.__new__(_Block)
            b.data = <char *>addr
            b.size = b.cap = <Py_ssize_t>n
            b.map_len = n
            b.reader = self
        self._off += <uint64_t>b.size
        return b if b.size else None

    cdef _Block _read_copy(self, int fd, size_t n):
        cdef _Block b = _new_block(<Py_ssize_t>n)
        b.size = _read_full(fd, b.data, <Py_ssize_t>n, <off_t>self._off)
        return b


cdef class Chunker:
    """Streaming FastCDC 2020 chunker (native). See dedupe.chunking for the contract."""

    cdef ddp_cdc_config _cfg
    cdef ddp_cdc_state _st
    cdef object _src             # bytes or _Block holding the pending stream bytes ...
    cdef const char *_src_data   # ... at _src_data[_off:_src_len]
    cdef Py_ssize_t _src_len
    cdef Py_ssize_t _off
    cdef list _pool              # _Blocks this chunker may reuse once unreferenced
    cdef readonly object params

    def __cinit__(self):
        self._pool = []
        self._drop_pending()

    def __init__(self, params, gear):
        cdef const uint8_t[::1] g = gear
        if g.shape[0] != DDP_CDC_GEAR_BYTES:
            raise ValueError(f"a gear table has {DDP_CDC_GEAR_BYTES} bytes, not {g.shape[0]}")
        if ddp_cdc_init(&self._cfg, &g[0], params.min_size, params.avg_size,
                        params.max_size, params.normalization) != DDP_CDC_OK:
            raise ValueError(f"invalid chunker parameters: {params!r}")
        self.params = params

    cdef void _drop_pending(self):
        self._src = _EMPTY
        self._src_data = PyBytes_AS_STRING(_EMPTY)
        self._src_len = 0
        self._off = 0
        ddp_cdc_state_reset(&self._st)

    cdef list _cut(self, object owner, const char *data, Py_ssize_t start, Py_ssize_t length,
                   int eof, ddp_cdc_state *st, Py_ssize_t *consumed):
        """Chunks of data[start:length] (owned by owner; a chunk starts at start and st is
        its progress), as memoryview slices of owner. Sets *consumed to the offset after
        the last chunk returned."""
        cdef const uint8_t *p = <const uint8_t *>data + start
        cdef size_t n = <size_t>(length - start)
        cdef size_t cap = ddp_cdc_max_chunks(&self._cfg, n)
        cdef size_t guess = n // (self._cfg.avg_size // 2) + 16
        cdef size_t total = 0, got, base = 0, k
        cdef size_t *ends
        cdef size_t *grown
        cdef bint oom = False
        if guess < cap:
            cap = guess
        ends = <size_t *>malloc(cap * sizeof(size_t))
        if ends == NULL:
            raise MemoryError()
        try:
            with nogil:
                while True:
                    got = ddp_cdc_scan(&self._cfg, st, p + base, n - base, eof,
                                       ends + total, cap - total)
                    for k in range(total, total + got):
                        ends[k] += base
                    total += got
                    if total < cap:
                        break
                    # Output full: go on from the last cut with a larger array.
                    base = ends[total - 1]
                    grown = <size_t *>realloc(ends, 2 * cap * sizeof(size_t))
                    if grown == NULL:
                        oom = True
                        break
                    ends = grown
                    cap *= 2
            if oom:
                raise MemoryError()
            out = []
            if total:
                mv = memoryview(owner)
                base = <size_t>start
                for k in range(total):
                    out.append(mv[base:start + ends[k]])
                    base = start + ends[k]
                consumed[0] = <Py_ssize_t>base
            else:
                consumed[0] = start
            return out
        finally:
            free(ends)

    cdef _Block _block(self, Py_ssize_t size):
        """A block of at least size bytes that no one but the pool refers to."""
        return _free_block(self._pool, size, _POOL_MAX)

    def feed(self, data):
        """Add bytes of the stream; return the chunks they complete (final cut points)."""
        cdef Py_buffer view
        cdef Py_ssize_t pending = self._src_len - self._off
        cdef Py_ssize_t length, take, consumed, start
        cdef object src
        cdef const char *src_data
        cdef _Block blk
        cdef bytes joint
        cdef size_t end, found
        cdef const uint8_t *jp
        cdef list out = []
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            length = view.len
            if length == 0:
                return out
            if PyBytes_CheckExact(data):
                # Immutable already: chunks are slices of the caller's bytes, no copy.
                src = data
                src_data = PyBytes_AS_STRING(data)
            elif type(data) is _Block:
                # A BlockReader block: read-only, rewritten only once nothing refers to it.
                src = data
                src_data = (<_Block>data).data
            else:
                # A mutable buffer is copied once, into a block that is never written
                # again while anything refers to it.
                blk = self._block(length)
                memcpy(blk.data, view.buf, length)
                blk.size = length
                src = blk
                src_data = blk.data
        finally:
            PyBuffer_Release(&view)

        if pending:
            # The chunk that straddles the pending bytes and the new data ends at most
            # max_size bytes after its start: join just that much (at most max_size
            # bytes copied per feed) and find its end, resuming the hash where the
            # previous feed stopped. Every later chunk is a slice of src.
            take = <Py_ssize_t>self._cfg.max_size - pending
            if take > length:
                take = length
            joint = PyBytes_FromStringAndSize(NULL, pending + take)
            memcpy(PyBytes_AS_STRING(joint), self._src_data + self._off, pending)
            memcpy(PyBytes_AS_STRING(joint) + pending, src_data, take)
            jp = <const uint8_t *>PyBytes_AS_STRING(joint)
            with nogil:
                found = ddp_cdc_scan(&self._cfg, &self._st, jp, <size_t>(pending + take), 0,
                                     &end, 1)
            if found == 0:
                # No cut yet: the chunk is still shorter than max_size, so take == length
                # and all of the joined bytes stay pending (self._st has the progress).
                self._src = joint
                self._src_data = PyBytes_AS_STRING(joint)
                self._src_len = pending + take
                self._off = 0
                return out
            out.append(memoryview(joint)[:end])
            start = <Py_ssize_t>end - pending
        else:
            start = 0
        out += self._cut(src, src_data, start, length, 0, &self._st, &consumed)
        self._src = src
        self._src_data = src_data
        self._src_len = length
        self._off = consumed
        return out

    def finish(self):
        """End of stream: the final chunk, if any bytes are left. Resets for a new stream
        and lets go of the buffers kept for reuse."""
        cdef Py_ssize_t consumed
        out = self._cut(self._src, self._src_data, self._off, self._src_len, 1, &self._st,
                        &consumed)
        self._drop_pending()
        self._pool = []
        return out

    def chunk_all(self, data):
        """All chunks of data as one complete stream, in one kernel call; does not touch
        the stream fed through feed(). bytes input is not copied; other buffers once."""
        cdef ddp_cdc_state st
        cdef Py_ssize_t consumed
        cdef bytes buf = <bytes>data if PyBytes_CheckExact(data) else bytes(data)
        ddp_cdc_state_reset(&st)
        return self._cut(buf, PyBytes_AS_STRING(buf), 0, len(buf), 1, &st, &consumed)
