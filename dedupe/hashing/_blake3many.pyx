# cython: language_level=3
"""Thin wrapper over csrc/blake3many.c: keyed BLAKE3 of a batch of chunks in one call
without the GIL (the contract is in csrc/blake3many.h). dedupe.hashing uses it for chunk
ids when it is built, and the blake3 package otherwise; both give the same ids."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc


cdef extern from "blake3many.h" nogil:
    int DDP_B3_PORTABLE
    int DDP_B3_LANES4
    int DDP_B3_AVX2
    int DDP_B3_AVX512
    int DDP_B3_BEST
    int ddp_b3_keyed_many(int impl, const uint8_t *key, size_t n, const uint8_t *const *src,
                          const size_t *len, uint8_t *out)
    int ddp_b3_available(int impl)
    int ddp_b3_best()


# The implementations by name, and the one this CPU runs by default.
IMPLEMENTATIONS = {
    "portable": DDP_B3_PORTABLE,
    "lanes4": DDP_B3_LANES4,
    "avx2": DDP_B3_AVX2,
    "avx512": DDP_B3_AVX512,
}
BEST = {v: k for k, v in IMPLEMENTATIONS.items()}[ddp_b3_best()]


def available():
    """Names of the implementations this CPU can run."""
    return [name for name, impl in IMPLEMENTATIONS.items() if ddp_b3_available(impl)]


def keyed_many(bytes key not None, list chunks not None, str implementation="best"):
    """[BLAKE3(key, chunk) for chunk in chunks] (32-byte digests), computed in one call
    without the GIL. `implementation` picks one of available() (tests compare them)."""
    cdef int impl = ddp_b3_best() if implementation == "best" else IMPLEMENTATIONS[implementation]
    if PyBytes_GET_SIZE(key) != 32:
        raise ValueError("a BLAKE3 key is 32 bytes")
    if not ddp_b3_available(impl):
        raise ValueError(f"{implementation} does not run on this CPU")
    cdef const uint8_t *k = <const uint8_t *>PyBytes_AS_STRING(key)
    cdef Py_ssize_t n = len(chunks), i, got = 0
    cdef bytes digests = PyBytes_FromStringAndSize(NULL, n * 32)
    cdef uint8_t *out = <uint8_t *>PyBytes_AS_STRING(digests)
    cdef Py_buffer *views = NULL
    cdef const uint8_t **src = NULL
    cdef size_t *lens = NULL
    cdef int rc
    try:
        views = <Py_buffer *>malloc((n or 1) * sizeof(Py_buffer))
        src = <const uint8_t **>malloc((n or 1) * sizeof(uint8_t *))
        lens = <size_t *>malloc((n or 1) * sizeof(size_t))
        if not (views and src and lens):
            raise MemoryError()
        for i in range(n):
            PyObject_GetBuffer(chunks[i], &views[i], PyBUF_SIMPLE)
            got += 1
            src[i] = <const uint8_t *>views[i].buf
            lens[i] = <size_t>views[i].len
        with nogil:
            rc = ddp_b3_keyed_many(impl, k, n, src, lens, out)
        if rc != 0:  # the implementation runs (checked above): scratch memory
            raise MemoryError()
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])
        free(views)
        free(<void *>src)
        free(lens)
    return [digests[i * 32:(i + 1) * 32] for i in range(n)]
