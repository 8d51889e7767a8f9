# Shared with other native modules (dedupe.store._blobcodec cimports these): read-only
# blocks of memory that are reused only once nothing refers to them.

cdef class _Block:
    cdef char *data
    cdef Py_ssize_t size
    cdef Py_ssize_t cap
    cdef size_t map_len  # nonzero: data is a MapReader window of that many bytes
    cdef readonly object reader  # that MapReader, or None (its `torn` must outlive the window)


cdef _Block _free_block(list pool, Py_ssize_t size, Py_ssize_t keep, size_t align=*)
