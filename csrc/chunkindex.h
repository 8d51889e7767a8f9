/*
 * chunkindex.h - compact in-memory chunk index of dedupe: chunk id -> location.
 *
 * Plain C99, no Python.h. Every symbol is prefixed ddp_ / DDP_. Nothing here is on disk:
 * the layout may change freely. The Python face is dedupe.store._chunkindex.ChunkTable.
 *
 * Keys are keyed-BLAKE3 chunk ids, uniformly random, so their first 8 bytes (read in
 * host byte order) are the hash: nothing is rehashed. Values are four uint32: pack_no
 * (global pack number), offset, stored_length, raw_length. Lookups take 32-byte ids;
 * any id is a key, the all-zero id included (emptiness lives in the slot array, never
 * in the key).
 *
 * The table keeps and compares the first DDP_IDX_KEY_BYTES (24) bytes of an id, not all
 * 32: two ids that agree in those 192 bits are one key. That saves 8 of 56 bytes an
 * entry (8 MiB of a 4 GiB page database's 1M chunks). What a collision would do, and
 * what it costs, is in docs/FORMAT.md section 11 ("Chunk ids in memory"): a backup,
 * verify, quarantine and replicas would take one chunk for the other; a restore would
 * not (it plans with the manifest's full ids, windowplan.c, and opens each blob under
 * its full id, blobcodec.c), so the chunk fails its restore loudly. By chance: under
 * 2^-133 for 2^30 chunks. Aimed: only holders of the id key can compute ids at all, and
 * a pair costs them ~2^96 BLAKE3 calls, a match to a chunk they did not choose ~2^192.
 * Nothing reads an id back out of the table.
 *
 * Layout (two parts):
 *   entries  every (key, value) pair, 40 bytes, dense, in insertion order, in segments of
 *            DDP_IDX_SEG_ENTRIES entries: growing adds a segment, never moves or copies
 *            an entry, and at most one segment is partly used;
 *   slots    an open-addressing (linear probing) array of nslots uint32, nslots any
 *            integer in [DDP_IDX_MIN_SLOTS, 2^32]; the home slot of hash h is
 *            ((h >> 32) * nslots) >> 32 (multiply-shift range reduction, so nslots need
 *            not be a power of two). A slot is 0 when empty, else
 *                (low 32 bits of h, with the low b bits cleared) | (entry number + 1)
 *            where b is the bit length of the largest entry count the slot array
 *            holds: the entry number takes b bits and the remaining 32 - b bits are a
 *            tag of the hash, so a probe only reads an entry (a second cache miss) when
 *            the tag matches (b = 24 at 12.5M slots: 8 tag bits, 1 false read in 256).
 *
 * Load: at most 3/4 of the slots are used. When an insert finds count == 3/4 nslots,
 * the slot array is rebuilt 1.5 times larger from the entries (a new array is allocated
 * first, so a failed allocation leaves the table as it was; then the old one is freed).
 *
 * Memory per entry, N entries (all of it the lookup needs):
 *   entries   40 B, plus the unused part of the last segment (< 20 KiB in all) and the
 *             segment directory (8 B per 512 entries, grown by doubling: <= 1/32 B);
 *   slots     4 * nslots / N: 5.33 B just before growth (load 3/4), 8 B just after
 *             (load 1/2); while growing both arrays exist: 4 * (4/3 + 2) = 13.33 B.
 * So steady state is 45.3 .. 48 B per entry, the transient peak during growth 53.4 B,
 * plus at most 20,480 / N B of segment slack (2 B at 10k entries, 0.2 B at 100k):
 * under 56 B per entry at every moment once N >= 10,000. ddp_idx_memory() counts exactly
 * the bytes requested from malloc (malloc's own headers, 16 B per 20 KiB segment, are
 * not counted: < 0.1%). Growth costs one pass over the entries, and ddp_idx_reserve()
 * avoids it when the final count is known.
 *
 * No removal: prune builds a new table. A table holds at most DDP_IDX_MAX_ENTRIES.
 *
 * Thread safety: functions that take a const ddp_idx * only read and may run in any
 * number of threads at once; every other call on a table needs exclusive access.
 * Nothing aborts: allocation failure is reported as DDP_IDX_ENOMEM.
 */
#ifndef DDP_CHUNKINDEX_H
#define DDP_CHUNKINDEX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DDP_IDX_ID_BYTES      32u
#define DDP_IDX_KEY_BYTES     24u   /* of an id, kept and compared (see the top) */
#define DDP_IDX_RECORD_BYTES  48u   /* index object entry: <32sIIII, little-endian */
#define DDP_IDX_SEG_SHIFT     9u
#define DDP_IDX_SEG_ENTRIES   (1u << DDP_IDX_SEG_SHIFT)   /* entries per segment: 512 */
#define DDP_IDX_MIN_SLOTS     16u
/* 3/4 of 2^32 slots. */
#define DDP_IDX_MAX_ENTRIES   ((size_t)3 << 30)
/* pack_no of "absent" in ddp_idx_get_many's output; no stored pack_no may equal it. */
#define DDP_IDX_NO_PACK       UINT32_C(0xFFFFFFFF)

/* Return codes. Non-negative codes are results, negative ones errors. */
#define DDP_IDX_OK       0     /* done; for ddp_idx_put: the id was absent and is added */
#define DDP_IDX_EXISTS   1     /* ddp_idx_put: the id was present */
#define DDP_IDX_ENOMEM   (-1)  /* an allocation failed */
#define DDP_IDX_EFULL    (-2)  /* more than DDP_IDX_MAX_ENTRIES entries would be needed */
#define DDP_IDX_EINVAL   (-3)  /* an argument is out of its documented range */

typedef struct ddp_idx_value {
    uint32_t pack_no;
    uint32_t offset;
    uint32_t stored_length;
    uint32_t raw_length;
} ddp_idx_value;

typedef struct ddp_idx ddp_idx;  /* opaque */

/* A new empty table with room for expected entries before its first growth (0 is
 * fine). Returns NULL if memory runs out or expected > DDP_IDX_MAX_ENTRIES. */
ddp_idx *ddp_idx_create(size_t expected);

/* Free the table and everything it owns. NULL is ignored. */
void ddp_idx_destroy(ddp_idx *t);

/* Make n entries fit without growing the slot array (and the segment directory): one
 * rebuild now instead of several later. Entries are still allocated as they arrive,
 * so reserving more than will be used costs 4 B per slot only (n * 5.33 B).
 * Returns DDP_IDX_OK (also when the table is already big enough), DDP_IDX_ENOMEM or
 * DDP_IDX_EFULL; on error the table is unchanged. */
int ddp_idx_reserve(ddp_idx *t, size_t n);

/* Look id (DDP_IDX_ID_BYTES bytes) up. Returns 1 and sets *out (if out is not NULL)
 * when present, 0 when absent (*out untouched). */
int ddp_idx_get(const ddp_idx *t, const uint8_t *id, ddp_idx_value *out);

/* Insert or update id.
 *   absent: adds (id, *v), returns DDP_IDX_OK;
 *   present: sets *old (if old is not NULL) to the value it had, replaces it with *v
 *            when overwrite is nonzero, and returns DDP_IDX_EXISTS;
 *   DDP_IDX_EINVAL if v->pack_no == DDP_IDX_NO_PACK; DDP_IDX_ENOMEM, DDP_IDX_EFULL:
 *            the table is unchanged (it may have a larger slot array).
 * This is what a caller needs for "replace only when the old location is unusable
 * and the new one usable": put without overwrite, judge *old, put again with it. */
int ddp_idx_put(ddp_idx *t, const uint8_t *id, const ddp_idx_value *v, int overwrite,
                ddp_idx_value *old);

/* Bulk insert of index object entries: records[0 .. n * DDP_IDX_RECORD_BYTES) holds n
 * records <32sIIII> (chunk id, local pack_no, offset, stored_length, raw_length;
 * little-endian whatever the host, any alignment). A record's pack_no is local to its
 * index object: pack_map[local] is the global pack number stored.
 *
 * Records are taken in order. One whose id is present (stored earlier, or by an earlier
 * record of the same call) is not stored (the first copy wins); its index (0-based,
 * relative to records) is written to dups[*ndups] instead, so that the caller can apply
 * its own rule to the rare duplicate. The call stops early when dup_cap duplicates are
 * written: call again with records + *done * DDP_IDX_RECORD_BYTES and n - *done.
 * *done is the number of records taken, *ndups the number of indices written to dups
 * (dups may be NULL when dup_cap is 0: then the call stops at the first duplicate).
 *
 * Returns DDP_IDX_OK (*done == n, or *ndups == dup_cap), or:
 *   DDP_IDX_EINVAL  some record among the n has local pack_no >= map_len or maps to
 *                   DDP_IDX_NO_PACK: checked before any insert, nothing is stored,
 *                   *done = index of the first such record;
 *   DDP_IDX_ENOMEM, DDP_IDX_EFULL: records [0, *done) are taken (the table is valid
 *                   and holds them), the rest are not. */
int ddp_idx_put_records(ddp_idx *t, const uint8_t *records, size_t n,
                        const uint32_t *pack_map, size_t map_len, size_t *dups,
                        size_t dup_cap, size_t *done, size_t *ndups);

/* Batch lookups of n ids stored back to back in ids[0 .. n * DDP_IDX_ID_BYTES), with
 * memory prefetching across the batch (several times faster than n single lookups on a
 * table bigger than the CPU caches). Return the number of ids present.
 *   ddp_idx_contains_many: flags[i] = 1 if id i is present, else 0;
 *   ddp_idx_get_many: out[i] = the value of id i, or {DDP_IDX_NO_PACK, 0, 0, 0}. */
size_t ddp_idx_contains_many(const ddp_idx *t, const uint8_t *ids, size_t n, uint8_t *flags);
size_t ddp_idx_get_many(const ddp_idx *t, const uint8_t *ids, size_t n, ddp_idx_value *out);

/* ddp_idx_contains_many over ids that each start a record of `stride` bytes (stride >=
 * DDP_IDX_ID_BYTES): keys[k * stride .. + 32) is id k. Chunk table records (36 bytes:
 * id, length) are looked up where they lie, without copying their ids out. */
size_t ddp_idx_contains_strided(const ddp_idx *t, const uint8_t *keys, size_t stride, size_t n,
                                uint8_t *flags);

/* Number of entries. */
size_t ddp_idx_count(const ddp_idx *t);

/* Number of slots of the slot array; the table grows when an insert would make
 * count exceed 3/4 of it (floor(3 * slots / 4) entries fit). */
size_t ddp_idx_slots(const ddp_idx *t);

/* Bytes of memory the table holds (its struct, slot array, segments, directory). */
size_t ddp_idx_memory(const ddp_idx *t);

#ifdef __cplusplus
}
#endif

#endif /* DDP_CHUNKINDEX_H */
