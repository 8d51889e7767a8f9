/*
 * prunetable.h - prune's view of every index entry, in one sorted array (dedupe).
 *
 * Plain C99, no Python.h. Every symbol is prefixed ddp_pt_ / DDP_PT_. Nothing here is on
 * disk. The Python face is dedupe.store._prunetable.PruneTable; the rules it implements
 * (which copy of a live chunk is kept, which entries stay indexed) are prune's, written
 * out in dedupe/engine/prune.py.
 *
 * Prune must see every copy of every indexed chunk (a chunk may be listed by several
 * index objects, in several packs) and which chunks some generation still needs. Python
 * objects for that cost ~600 bytes a chunk; this table costs sizeof(ddp_pt_entry) = 56
 * bytes an entry, plus a few bytes a pack.
 *
 * Use, in this order:
 *   1. ddp_pt_add: append index object entries (<32sIIII> records whose pack numbers are
 *      local to their object; a map turns them into global pack numbers). Each entry
 *      gets a sequence number: the order entries were added in.
 *   2. ddp_pt_sort: sort by (chunk id, sequence). The entries of one chunk id are then a
 *      *run*, in the order they were added.
 *   3. ddp_pt_set_unusable: a copy that must not count (its pack is gone, or verify
 *      quarantined it, or prune found it does not open).
 *   4. ddp_pt_mark_live: chunk table records (<32sI>) of every generation.
 *   5. ddp_pt_live_bytes, ddp_pt_choose, ddp_pt_usage, ddp_pt_emit_*: the decisions.
 *      The order of packs a choice follows is the caller's (prune computes it exactly,
 *      in Python, from ddp_pt_live_bytes and the packs' lengths).
 *
 * Thread safety: none; one caller at a time. Nothing aborts: allocation failure is
 * DDP_PT_ENOMEM.
 */
#ifndef DDP_PRUNETABLE_H
#define DDP_PRUNETABLE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DDP_PT_ID_BYTES      32u
#define DDP_PT_ENTRY_BYTES   48u  /* index object entry: <32sIIII>, little-endian */
#define DDP_PT_CHUNK_BYTES   36u  /* chunk table record: <32sI>, little-endian */
#define DDP_PT_MOVE_BYTES    48u  /* ddp_pt_emit_moving: <32sIIII>, pack = global */

#define DDP_PT_OK       0
#define DDP_PT_ENOMEM   (-1)
#define DDP_PT_EINVAL   (-2)  /* an argument is out of its documented range */
#define DDP_PT_EORDER   (-3)  /* called out of the order above */

/* Entry flags. */
#define DDP_PT_UNUSABLE  1u  /* not a copy prune may keep or choose */
#define DDP_PT_LIVE      2u  /* some generation references this entry's chunk id */
#define DDP_PT_CHOSEN    4u  /* the one copy kept of a live chunk */
#define DDP_PT_CHECKED   8u  /* handed out by ddp_pt_emit_unchecked once */

typedef struct ddp_pt_entry {
    uint8_t id[DDP_PT_ID_BYTES];
    uint32_t pack;   /* global pack number, < the table's pack count */
    uint32_t offset;
    uint32_t stored;
    uint32_t raw;
    uint32_t seq;    /* order added */
    uint32_t flags;
} ddp_pt_entry;

typedef struct ddp_pt ddp_pt;  /* opaque */

/* A table for entries of `packs` packs (global numbers 0 .. packs - 1). NULL when memory
 * runs out. */
ddp_pt *ddp_pt_create(uint32_t packs);
void ddp_pt_destroy(ddp_pt *t);

/* Append n records <32sIIII> (any alignment); map[local] is the global number of a
 * record's local pack number. DDP_PT_EINVAL (nothing appended, *bad = index of the
 * record) when a local number is >= map_len or maps to a number >= packs, or when the
 * table would hold 2^32 entries or more. */
int ddp_pt_add(ddp_pt *t, const uint8_t *records, size_t n, const uint32_t *map,
               size_t map_len, size_t *bad);

/* Sort the entries by (id, seq). ddp_pt_add is refused afterwards. */
int ddp_pt_sort(ddp_pt *t);

size_t ddp_pt_count(const ddp_pt *t);   /* entries */
size_t ddp_pt_ids(const ddp_pt *t);     /* distinct chunk ids (runs); after sort */
size_t ddp_pt_live_ids(const ddp_pt *t); /* distinct chunk ids flagged live */
size_t ddp_pt_memory(const ddp_pt *t);  /* bytes requested from malloc */

/* Flag as unusable every entry of a pack whose flag in pack_gone[0 .. packs) is
 * nonzero; or every entry of (id, pack); or the entries of id that name exactly (pack,
 * offset, stored, raw). Return how many entries they flagged (after sort; before, 0). */
size_t ddp_pt_unusable_packs(ddp_pt *t, const uint8_t *pack_gone);
size_t ddp_pt_set_unusable(ddp_pt *t, const uint8_t *id, uint32_t pack);
size_t ddp_pt_set_unusable_entry(ddp_pt *t, const uint8_t *id, uint32_t pack, uint32_t offset,
                                 uint32_t stored, uint32_t raw);

/* Flag as live every entry whose id is that of one of n chunk table records <32sI>.
 * Returns how many of the records name an id no entry has; the first cap of those ids
 * are copied to missing (32 bytes each; missing may be NULL when cap is 0). */
size_t ddp_pt_mark_live(ddp_pt *t, const uint8_t *records, size_t n, uint8_t *missing,
                        size_t cap);

/* live[p] = sum of `stored` over live chunk ids with a usable copy in pack p, each chunk
 * id counted once per pack (live[0 .. packs), zeroed first). DDP_PT_ENOMEM is possible
 * (a run of one id longer than 16 entries is sorted by pack), as for ddp_pt_usage. */
int ddp_pt_live_bytes(ddp_pt *t, uint64_t *live);

/* Choose one usable copy of every live chunk id: one in the pack of the greatest
 * rank[p] (the caller's order of packs, all ranks distinct), the earliest added of that
 * pack's entries. Clears every earlier choice (and ddp_pt_emit_unchecked's place).
 * Returns the number of live ids with no usable copy; the first is copied to lost. */
size_t ddp_pt_choose(ddp_pt *t, const uint32_t *rank, uint8_t *lost);

/* used[p] = sum of `stored` of the copies chosen in pack p; blobs[p] = distinct chunk
 * ids with an entry in pack p (usable or not). Both zeroed first. */
int ddp_pt_usage(ddp_pt *t, uint64_t *used, uint64_t *blobs);

/* The chosen copies not yet handed out whose chunk id has another usable entry naming
 * other bytes (another pack, or another offset or length in the same pack), as <32sIIII>
 * records with global pack numbers, written to out (room for cap records); each is
 * flagged checked. Returns the number written (< cap: all done). Each call goes on
 * where the last stopped, until ddp_pt_choose starts over. */
size_t ddp_pt_emit_unchecked(ddp_pt *t, uint8_t *out, size_t cap);

/* The chosen copies in packs whose moving[p] is nonzero, as <32sIIII> records with
 * global pack numbers, in (pack, offset) order, into out (room for cap records).
 * Returns the number of such copies (the records are written only when it is <= cap,
 * and SIZE_MAX if memory ran out then); *stored_sum = their stored bytes. */
size_t ddp_pt_emit_moving(const ddp_pt *t, const uint8_t *moving, uint8_t *out, size_t cap,
                          uint64_t *stored_sum);

/* The entries that stay indexed in kept packs (number[p] != UINT32_MAX is pack p's
 * number in the new index object), as <32sIIII> records with those numbers, in chunk id
 * order: for a live id its chosen copy when that is in a kept pack; for any other id its
 * earliest added usable copy in a kept pack. Returns the number of such entries; the
 * first cap of them are written. */
size_t ddp_pt_emit_kept(const ddp_pt *t, const uint32_t *number, uint8_t *out, size_t cap);


#ifdef __cplusplus
}
#endif

#endif /* DDP_PRUNETABLE_H */
