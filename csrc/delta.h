/*
 * delta.h - the delta of a chunk table against its parent's (docs/FORMAT.md section 8.1),
 * computed natively and fed in pieces. Plain C99 plus POSIX pread, no Python.h. Every
 * symbol is prefixed ddp_delta_.
 *
 * The pure-Python dedupe.format.delta.make_delta_py is the spec; this kernel must produce
 * exactly its output (tests/store/test_delta.py compares them):
 *
 *   for each record of the table, in order:
 *     - if it equals parent[expect] (0 <= expect < n_parent), the current copy op grows by
 *       one and expect advances;
 *     - else if it occurs in the parent, a new copy op starts at its FIRST occurrence;
 *     - else it is appended to the literal table, expect becomes -1, and the current
 *       literal op grows by one (or a new one starts).
 *
 * Records are 36 bytes (chunk id, raw length). The parent is either in memory or in a
 * file read with pread through a 64 KiB window, so that a backup need not hold its
 * parent's table: what the kernel holds is a table of first occurrences with slots for
 * DISTINCT parent records (at most 3/4 full, grown by half: 4/3 to 2 slots per distinct
 * record), the window, and the ops.
 * While the parent is indexed, a slot keeps the record's position and a 32-bit tag of its
 * hash (8 bytes); the slot index comes from the tag, so the table grows without reading
 * the parent again. Once it is indexed nothing grows, and each slot keeps its position
 * and the tag's high 16 bits (6 bytes: 8 to 12 bytes per distinct record). A tag match is
 * confirmed by comparing the parent's record itself.
 */
#ifndef DDP_DELTA_H
#define DDP_DELTA_H

#include <stddef.h>
#include <stdint.h>

#define DDP_DELTA_RECORD 36
#define DDP_DELTA_COPY 0
#define DDP_DELTA_LITERAL 1
/* Positions are 32-bit; one value marks an empty slot. */
#define DDP_DELTA_MAX_PARENT 0xFFFFFFFEull

/* One op: kind COPY (start, count) or LITERAL (count, unused); 16 bytes. A copy's count
 * fits 32 bits (it copies consecutive parent records, at most DDP_DELTA_MAX_PARENT); a
 * literal's count, which the parent does not bound, is `a`. */
typedef struct {
    uint64_t a;
    uint32_t b;
    uint32_t kind;
} ddp_delta_op;

typedef struct ddp_delta ddp_delta;

/* Index the parent's n_parent records: in memory at `parent` when it is not NULL, else
 * read from descriptor `fd` at offsets 0 .. n_parent*36 (the caller keeps both valid
 * until ddp_delta_close). Returns NULL with errno set (ENOMEM, EINVAL, EIO for a file
 * shorter than n_parent records, or pread's error). */
ddp_delta *ddp_delta_open(const uint8_t *parent, int fd, uint64_t n_parent);

/* Feed the next n records of the table. The ones the parent lacks are copied to
 * `literal` (room for n records) and counted in *n_literal. Returns 0, or -1 with errno
 * set (ENOMEM, or a read error of the parent file); the delta is unusable then. */
int ddp_delta_feed(ddp_delta *d, const uint8_t *table, size_t n, uint8_t *literal,
                   size_t *n_literal);

/* The ops so far (valid until the next feed or close). */
const ddp_delta_op *ddp_delta_ops(const ddp_delta *d, size_t *n_ops);

/* The ops so far as JSON text, exactly as Python's json.dumps writes the list
 * [[0, start, count], [1, count], ...] with its default separators (so a manifest's meta
 * is the same bytes as when the ops were Python lists). Writes at most `cap` bytes to
 * `out` (no NUL) and returns the length of the whole text; call with out == NULL and
 * cap == 0 to learn the size first. Python lists of the ops take ~110 bytes an op, the
 * text ~12: an incremental of a 4 GiB page file has ~180,000 ops. */
size_t ddp_delta_ops_json(const ddp_delta *d, char *out, size_t cap);

/* Bytes the kernel holds (slots, window, ops): what tests and benchmarks report. */
size_t ddp_delta_memory(const ddp_delta *d);

void ddp_delta_close(ddp_delta *d);

#endif
