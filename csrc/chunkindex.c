/*
 * chunkindex.c - compact chunk index; the layout, the memory bound and every contract
 * are in chunkindex.h.
 */
#include "chunkindex.h"

#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define DDP_LIKELY(x) __builtin_expect(!!(x), 1)
#define DDP_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#define DDP_PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#else
#define DDP_LIKELY(x) (x)
#define DDP_PREFETCH(p) ((void)(p))
#define DDP_PREFETCH_W(p) ((void)(p))
#endif

/* How many ids ahead batch functions prefetch the home slot (and, half as far ahead,
 * the entry the slot points to). */
#define DDP_IDX_AHEAD 16u

#define DDP_IDX_SLOTS_MAX (UINT64_C(1) << 32)

typedef struct ddp_idx_entry {
    uint8_t id[DDP_IDX_KEY_BYTES];  /* the first bytes of the chunk id */
    ddp_idx_value v;
} ddp_idx_entry;

/* An entry is exactly 40 bytes (no padding): the memory bound depends on it. */
typedef char ddp_idx_entry_is_40_bytes[sizeof(ddp_idx_entry) == 40 ? 1 : -1];

struct ddp_idx {
    uint32_t *slots;        /* nslots; 0 empty, else tag | (entry number + 1) */
    uint64_t nslots;        /* DDP_IDX_MIN_SLOTS .. 2^32 */
    size_t limit;           /* entries that fit: floor(3 * nslots / 4) */
    uint32_t low;           /* low b bits set: the entry number + 1 part of a slot */
    size_t count;
    ddp_idx_entry **segs;   /* segment directory; segs[k] holds entries k * 512 .. */
    size_t nsegs, segs_cap;
};

static uint64_t ddp_idx_hash(const uint8_t *id)
{
    uint64_t h;
    memcpy(&h, id, sizeof h);
    return h;
}

static uint64_t ddp_idx_home(uint64_t h, uint64_t nslots)
{
    return ((h >> 32) * nslots) >> 32;
}

static size_t ddp_idx_limit(uint64_t nslots)
{
    return (size_t)(nslots * 3 / 4);
}

/* Low b bits set, b the bit length of limit: entry number + 1 <= limit fits in them. */
static uint32_t ddp_idx_low_mask(size_t limit)
{
    unsigned b = 0;
    while (b < 32 && ((uint64_t)1 << b) <= (uint64_t)limit)
        b++;
    return (uint32_t)(((uint64_t)1 << b) - 1);
}

static ddp_idx_entry *ddp_idx_entry_ptr(const ddp_idx *t, size_t e)
{
    return t->segs[e >> DDP_IDX_SEG_SHIFT] + (e & (DDP_IDX_SEG_ENTRIES - 1));
}

static uint32_t ddp_load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Slot index holding id (hash h), or, if absent, the empty slot where it would go
 * (*found says which). */
static uint64_t ddp_idx_probe(const ddp_idx *t, const uint8_t *id, uint64_t h, int *found)
{
    const uint32_t *slots = t->slots;
    const uint64_t n = t->nslots;
    const uint32_t high = ~t->low;
    const uint32_t tag = (uint32_t)h & high;
    uint64_t i = ddp_idx_home(h, n);
    for (;;) {
        const uint32_t s = slots[i];
        if (s == 0) {
            *found = 0;
            return i;
        }
        if ((s & high) == tag) {
            const ddp_idx_entry *e = ddp_idx_entry_ptr(t, (size_t)(s & t->low) - 1);
            if (memcmp(e->id, id, DDP_IDX_KEY_BYTES) == 0) {
                *found = 1;
                return i;
            }
        }
        if (++i == n)
            i = 0;
    }
}

/* Store entry number e (hash h) in the first empty slot from its home. */
static void ddp_idx_place(uint32_t *slots, uint64_t n, uint32_t low, uint64_t h, size_t e)
{
    uint64_t i = ddp_idx_home(h, n);
    while (slots[i] != 0)
        if (++i == n)
            i = 0;
    slots[i] = ((uint32_t)h & ~low) | (uint32_t)(e + 1);
}

/* Rebuild the slot array with nslots slots (limit(nslots) >= count). */
static int ddp_idx_rebuild(ddp_idx *t, uint64_t nslots)
{
    const size_t limit = ddp_idx_limit(nslots);
    const uint32_t low = ddp_idx_low_mask(limit);
    uint32_t *slots;
    size_t e;
    if (nslots > SIZE_MAX / sizeof(uint32_t))
        return DDP_IDX_ENOMEM;  /* 32-bit hosts */
    slots = (uint32_t *)calloc((size_t)nslots, sizeof(uint32_t));
    if (slots == NULL)
        return DDP_IDX_ENOMEM;
    for (e = 0; e < t->count; e++) {
        if (e + DDP_IDX_AHEAD < t->count) {
            const ddp_idx_entry *a = ddp_idx_entry_ptr(t, e + DDP_IDX_AHEAD);
            DDP_PREFETCH_W(&slots[ddp_idx_home(ddp_idx_hash(a->id), nslots)]);
        }
        ddp_idx_place(slots, nslots, low, ddp_idx_hash(ddp_idx_entry_ptr(t, e)->id), e);
    }
    free(t->slots);
    t->slots = slots;
    t->nslots = nslots;
    t->limit = limit;
    t->low = low;
    return DDP_IDX_OK;
}

/* Segment directory with room for the segments of n entries. */
static int ddp_idx_reserve_dir(ddp_idx *t, size_t n)
{
    const size_t need = (n + DDP_IDX_SEG_ENTRIES - 1) >> DDP_IDX_SEG_SHIFT;
    size_t cap = t->segs_cap ? t->segs_cap : 16;
    ddp_idx_entry **segs;
    if (need <= t->segs_cap)
        return DDP_IDX_OK;
    while (cap < need)
        cap *= 2;
    segs = (ddp_idx_entry **)realloc(t->segs, cap * sizeof *segs);
    if (segs == NULL)
        return DDP_IDX_ENOMEM;
    t->segs = segs;
    t->segs_cap = cap;
    return DDP_IDX_OK;
}

int ddp_idx_reserve(ddp_idx *t, size_t n)
{
    uint64_t want;
    int rc;
    if (n > DDP_IDX_MAX_ENTRIES)
        return DDP_IDX_EFULL;
    rc = ddp_idx_reserve_dir(t, n);
    if (rc != DDP_IDX_OK)
        return rc;
    if (n <= t->limit)
        return DDP_IDX_OK;
    want = ((uint64_t)n * 4 + 2) / 3;
    while (ddp_idx_limit(want) < n)
        want++;
    if (want > DDP_IDX_SLOTS_MAX)
        want = DDP_IDX_SLOTS_MAX;
    return ddp_idx_rebuild(t, want);
}

/* Room for one more entry: grow the slot array 1.5x when full, add a segment when the
 * last one is. On error the table is unchanged (apart from a larger slot array). */
static int ddp_idx_make_room(ddp_idx *t)
{
    if (t->count == t->limit) {
        uint64_t want = t->nslots + t->nslots / 2;
        int rc;
        if (t->nslots == DDP_IDX_SLOTS_MAX)
            return DDP_IDX_EFULL;
        if (want > DDP_IDX_SLOTS_MAX)
            want = DDP_IDX_SLOTS_MAX;
        rc = ddp_idx_rebuild(t, want);
        if (rc != DDP_IDX_OK)
            return rc;
    }
    if ((t->count & (DDP_IDX_SEG_ENTRIES - 1)) == 0 && (t->count >> DDP_IDX_SEG_SHIFT) == t->nsegs) {
        ddp_idx_entry *seg;
        if (ddp_idx_reserve_dir(t, t->count + 1) != DDP_IDX_OK)
            return DDP_IDX_ENOMEM;
        seg = (ddp_idx_entry *)malloc(DDP_IDX_SEG_ENTRIES * sizeof *seg);
        if (seg == NULL)
            return DDP_IDX_ENOMEM;
        t->segs[t->nsegs++] = seg;
    }
    return DDP_IDX_OK;
}

/* Append (id, v) as entry number count, at slot i (empty; only valid if no growth
 * happened since the probe) - the caller made room first. */
static void ddp_idx_append(ddp_idx *t, uint64_t slot, uint64_t h, const uint8_t *id,
                           const ddp_idx_value *v)
{
    ddp_idx_entry *e = ddp_idx_entry_ptr(t, t->count);
    memcpy(e->id, id, DDP_IDX_KEY_BYTES);
    e->v = *v;
    t->slots[slot] = ((uint32_t)h & ~t->low) | (uint32_t)(t->count + 1);
    t->count++;
}

/* Add an absent id whose empty slot, found by a probe, is *slot. */
static int ddp_idx_add_absent(ddp_idx *t, uint64_t slot, uint64_t h, const uint8_t *id,
                              const ddp_idx_value *v)
{
    const uint64_t before = t->nslots;
    int rc = ddp_idx_make_room(t);
    if (rc != DDP_IDX_OK)
        return rc;
    if (t->nslots != before) {
        /* Rebuilt: find the empty slot again (the id is still absent). */
        uint64_t i = ddp_idx_home(h, t->nslots);
        while (t->slots[i] != 0)
            if (++i == t->nslots)
                i = 0;
        slot = i;
    }
    ddp_idx_append(t, slot, h, id, v);
    return DDP_IDX_OK;
}

ddp_idx *ddp_idx_create(size_t expected)
{
    ddp_idx *t;
    if (expected > DDP_IDX_MAX_ENTRIES)
        return NULL;
    t = (ddp_idx *)calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    if (ddp_idx_rebuild(t, DDP_IDX_MIN_SLOTS) != DDP_IDX_OK
        || ddp_idx_reserve(t, expected) != DDP_IDX_OK) {
        ddp_idx_destroy(t);
        return NULL;
    }
    return t;
}

void ddp_idx_destroy(ddp_idx *t)
{
    size_t k;
    if (t == NULL)
        return;
    for (k = 0; k < t->nsegs; k++)
        free(t->segs[k]);
    free(t->segs);
    free(t->slots);
    free(t);
}

int ddp_idx_get(const ddp_idx *t, const uint8_t *id, ddp_idx_value *out)
{
    int found;
    const uint64_t i = ddp_idx_probe(t, id, ddp_idx_hash(id), &found);
    if (!found)
        return 0;
    if (out != NULL)
        *out = ddp_idx_entry_ptr(t, (size_t)(t->slots[i] & t->low) - 1)->v;
    return 1;
}

int ddp_idx_put(ddp_idx *t, const uint8_t *id, const ddp_idx_value *v, int overwrite,
                ddp_idx_value *old)
{
    const uint64_t h = ddp_idx_hash(id);
    int found;
    uint64_t i;
    if (v->pack_no == DDP_IDX_NO_PACK)
        return DDP_IDX_EINVAL;
    i = ddp_idx_probe(t, id, h, &found);
    if (found) {
        ddp_idx_entry *e = ddp_idx_entry_ptr(t, (size_t)(t->slots[i] & t->low) - 1);
        if (old != NULL)
            *old = e->v;
        if (overwrite)
            e->v = *v;
        return DDP_IDX_EXISTS;
    }
    return ddp_idx_add_absent(t, i, h, id, v);
}

int ddp_idx_put_records(ddp_idx *t, const uint8_t *records, size_t n,
                        const uint32_t *pack_map, size_t map_len, size_t *dups,
                        size_t dup_cap, size_t *done, size_t *ndups)
{
    size_t r, nd = 0;
    *done = 0;
    *ndups = 0;
    for (r = 0; r < n; r++) {
        const uint32_t local = ddp_load_le32(records + r * DDP_IDX_RECORD_BYTES + 32);
        if (local >= map_len || pack_map[local] == DDP_IDX_NO_PACK) {
            *done = r;
            return DDP_IDX_EINVAL;
        }
    }
    for (r = 0; r < n; r++) {
        const uint8_t *rec = records + r * DDP_IDX_RECORD_BYTES;
        const uint64_t h = ddp_idx_hash(rec);
        ddp_idx_value v;
        uint64_t i;
        int found, rc;
        if (r + DDP_IDX_AHEAD < n) {
            const uint8_t *a = rec + DDP_IDX_AHEAD * DDP_IDX_RECORD_BYTES;
            DDP_PREFETCH_W(&t->slots[ddp_idx_home(ddp_idx_hash(a), t->nslots)]);
        }
        i = ddp_idx_probe(t, rec, h, &found);
        if (found) {
            if (nd == dup_cap) {
                *done = r;
                *ndups = nd;
                return DDP_IDX_OK;
            }
            dups[nd++] = r;
            continue;
        }
        v.pack_no = pack_map[ddp_load_le32(rec + 32)];
        v.offset = ddp_load_le32(rec + 36);
        v.stored_length = ddp_load_le32(rec + 40);
        v.raw_length = ddp_load_le32(rec + 44);
        rc = ddp_idx_add_absent(t, i, h, rec, &v);
        if (rc != DDP_IDX_OK) {
            *done = r;
            *ndups = nd;
            return rc;
        }
    }
    *done = n;
    *ndups = nd;
    return DDP_IDX_OK;
}

/* The entry of id, or NULL if absent; the batch functions' inner lookup. */
static const ddp_idx_entry *ddp_idx_find(const ddp_idx *t, const uint8_t *id)
{
    int found;
    const uint64_t i = ddp_idx_probe(t, id, ddp_idx_hash(id), &found);
    return found ? ddp_idx_entry_ptr(t, (size_t)(t->slots[i] & t->low) - 1) : NULL;
}

/* Prefetches for a batch lookup at position k of n: the home slot of id k + AHEAD and
 * the entry that the home slot of id k + AHEAD/2 names, when its tag matches (that
 * slot was prefetched AHEAD/2 ids ago). */
static void ddp_idx_prefetch(const ddp_idx *t, const uint8_t *ids, size_t stride, size_t k,
                             size_t n)
{
    if (k + DDP_IDX_AHEAD < n) {
        const uint64_t h = ddp_idx_hash(ids + (k + DDP_IDX_AHEAD) * stride);
        const uint64_t i = ddp_idx_home(h, t->nslots);
        DDP_PREFETCH(&t->slots[i]);
        /* A probe run (8.5 slots on average for a miss at load 3/4) often crosses
         * into the next cache line. */
        if (i + 8 < t->nslots)
            DDP_PREFETCH(&t->slots[i + 8]);
    }
    if (k + DDP_IDX_AHEAD / 2 < n) {
        const uint64_t h = ddp_idx_hash(ids + (k + DDP_IDX_AHEAD / 2) * stride);
        const uint32_t s = t->slots[ddp_idx_home(h, t->nslots)];
        if (s != 0 && ((s ^ (uint32_t)h) & ~t->low) == 0)
            DDP_PREFETCH(ddp_idx_entry_ptr(t, (size_t)(s & t->low) - 1));
    }
}

size_t ddp_idx_contains_strided(const ddp_idx *t, const uint8_t *keys, size_t stride, size_t n,
                                uint8_t *flags)
{
    size_t k, hits = 0;
    for (k = 0; k < n; k++) {
        ddp_idx_prefetch(t, keys, stride, k, n);
        flags[k] = ddp_idx_find(t, keys + k * stride) != NULL;
        hits += flags[k];
    }
    return hits;
}

size_t ddp_idx_contains_many(const ddp_idx *t, const uint8_t *ids, size_t n, uint8_t *flags)
{
    return ddp_idx_contains_strided(t, ids, DDP_IDX_ID_BYTES, n, flags);
}

size_t ddp_idx_get_many(const ddp_idx *t, const uint8_t *ids, size_t n, ddp_idx_value *out)
{
    static const ddp_idx_value absent = {DDP_IDX_NO_PACK, 0, 0, 0};
    size_t k, hits = 0;
    for (k = 0; k < n; k++) {
        const ddp_idx_entry *e;
        ddp_idx_prefetch(t, ids, DDP_IDX_ID_BYTES, k, n);
        e = ddp_idx_find(t, ids + k * DDP_IDX_ID_BYTES);
        if (DDP_LIKELY(e != NULL)) {
            out[k] = e->v;
            hits++;
        } else {
            out[k] = absent;
        }
    }
    return hits;
}

size_t ddp_idx_count(const ddp_idx *t)
{
    return t->count;
}

size_t ddp_idx_slots(const ddp_idx *t)
{
    return (size_t)t->nslots;
}

size_t ddp_idx_memory(const ddp_idx *t)
{
    return sizeof *t + (size_t)t->nslots * sizeof(uint32_t)
           + t->nsegs * DDP_IDX_SEG_ENTRIES * sizeof(ddp_idx_entry)
           + t->segs_cap * sizeof(ddp_idx_entry *);
}
