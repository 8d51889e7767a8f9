/*
 * prunetable.c - see prunetable.h for the contract.
 *
 * Entries live in one array, grown by doubling while they are added, then sorted by
 * (id, seq). Lookups by id go through a bucket directory over the ids' leading bits
 * (ids are keyed BLAKE3 output, uniformly spread): bucket b holds the entries whose
 * first `bits` bits are b, about four of them, so a lookup reads one or two cache lines
 * of the directory and scans a few entries instead of a binary search's twenty.
 */
#include "prunetable.h"

#include <stdlib.h>
#include <string.h>

struct ddp_pt {
    ddp_pt_entry *e;
    size_t n, cap;
    uint32_t packs;
    int sorted;
    size_t check_from;  /* ddp_pt_emit_unchecked resumes here; ddp_pt_choose resets it */
    unsigned bits;      /* bucket directory: 2^bits buckets */
    uint32_t *bucket;   /* 2^bits + 1 entry numbers: bucket b is [bucket[b], bucket[b+1]) */
};

static uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void store_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* The first `bits` bits of an id, big-endian (so bucket order is id order). */
static uint32_t lead(const uint8_t *id, unsigned bits)
{
    uint32_t top = (uint32_t)id[0] << 24 | (uint32_t)id[1] << 16 | (uint32_t)id[2] << 8 | id[3];
    return bits ? top >> (32 - bits) : 0;
}

ddp_pt *ddp_pt_create(uint32_t packs)
{
    ddp_pt *t = calloc(1, sizeof *t);
    if (t)
        t->packs = packs;
    return t;
}

void ddp_pt_destroy(ddp_pt *t)
{
    if (!t)
        return;
    free(t->e);
    free(t->bucket);
    free(t);
}

int ddp_pt_add(ddp_pt *t, const uint8_t *records, size_t n, const uint32_t *map,
               size_t map_len, size_t *bad)
{
    size_t i;
    if (t->sorted)
        return DDP_PT_EORDER;
    for (i = 0; i < n; i++) {
        uint32_t local = load_le32(records + i * DDP_PT_ENTRY_BYTES + DDP_PT_ID_BYTES);
        if (local >= map_len || map[local] >= t->packs) {
            *bad = i;
            return DDP_PT_EINVAL;
        }
    }
    if (n > (size_t)UINT32_MAX - t->n) {
        *bad = 0;
        return DDP_PT_EINVAL;
    }
    if (t->n + n > t->cap) {
        size_t cap = t->cap ? t->cap : 1024;
        ddp_pt_entry *grown;
        while (cap < t->n + n)
            cap *= 2;
        grown = realloc(t->e, cap * sizeof *grown);
        if (!grown)
            return DDP_PT_ENOMEM;
        t->e = grown;
        t->cap = cap;
    }
    for (i = 0; i < n; i++) {
        const uint8_t *r = records + i * DDP_PT_ENTRY_BYTES;
        ddp_pt_entry *x = &t->e[t->n];
        memcpy(x->id, r, DDP_PT_ID_BYTES);
        x->pack = map[load_le32(r + 32)];
        x->offset = load_le32(r + 36);
        x->stored = load_le32(r + 40);
        x->raw = load_le32(r + 44);
        x->seq = (uint32_t)t->n;
        x->flags = 0;
        t->n++;
    }
    return DDP_PT_OK;
}

static int by_id_seq(const void *a, const void *b)
{
    const ddp_pt_entry *x = a, *y = b;
    int c = memcmp(x->id, y->id, DDP_PT_ID_BYTES);
    if (c)
        return c;
    return (x->seq > y->seq) - (x->seq < y->seq);
}

/* Sort entries [lo, hi), all in one bucket, by (id, seq): insertion sort for the few a
 * bucket holds when ids are random, qsort for a bucket someone filled on purpose. */
static void sort_bucket(ddp_pt_entry *e, size_t lo, size_t hi)
{
    size_t i, j;
    if (hi - lo > 16) {
        qsort(e + lo, hi - lo, sizeof *e, by_id_seq);
        return;
    }
    for (i = lo + 1; i < hi; i++) {
        ddp_pt_entry x = e[i];
        for (j = i; j > lo && by_id_seq(&e[j - 1], &x) > 0; j--)
            e[j] = e[j - 1];
        e[j] = x;
    }
}

int ddp_pt_sort(ddp_pt *t)
{
    unsigned bits = 0;
    size_t b, i, nb;
    uint32_t *bucket, *next;
    if (t->sorted)
        return DDP_PT_EORDER;
    while (bits < 24 && ((size_t)4 << bits) < t->n)
        bits++;
    nb = (size_t)1 << bits;
    bucket = calloc(nb + 1, sizeof *bucket);
    next = malloc(nb * sizeof *next);
    if (!bucket || !next) {
        free(bucket);
        free(next);
        return DDP_PT_ENOMEM;
    }
    /* In place, by the leading bits (American flag sort): bucket[b] = where bucket b
     * starts; next[b] = its first place not yet known to hold one of its entries. */
    for (i = 0; i < t->n; i++)
        bucket[lead(t->e[i].id, bits) + 1]++;
    for (b = 0; b < nb; b++) {
        bucket[b + 1] += bucket[b];
        next[b] = bucket[b];
    }
    for (b = 0; b < nb; b++) {
        while (next[b] < bucket[b + 1]) {
            ddp_pt_entry *x = &t->e[next[b]];
            uint32_t home = lead(x->id, bits);
            if (home == b) {
                next[b]++;
            } else {
                ddp_pt_entry held = *x;
                *x = t->e[next[home]];
                t->e[next[home]++] = held;
            }
        }
    }
    free(next);
    for (b = 0; b < nb; b++)
        sort_bucket(t->e, bucket[b], bucket[b + 1]);
    t->bucket = bucket;
    t->bits = bits;
    t->sorted = 1;
    /* Give back what doubling left unused. */
    if (t->n && t->n < t->cap) {
        ddp_pt_entry *fit = realloc(t->e, t->n * sizeof *fit);
        if (fit) {
            t->e = fit;
            t->cap = t->n;
        }
    }
    return DDP_PT_OK;
}

size_t ddp_pt_count(const ddp_pt *t) { return t->n; }

/* One past the last entry of the run that starts at i. */
static size_t run_end(const ddp_pt *t, size_t i)
{
    size_t j = i + 1;
    while (j < t->n && memcmp(t->e[j].id, t->e[i].id, DDP_PT_ID_BYTES) == 0)
        j++;
    return j;
}

/* Runs whose first entry has every flag of mask (mask 0: every run). */
static size_t count_runs(const ddp_pt *t, uint32_t mask)
{
    size_t i, runs = 0;
    if (!t->sorted)
        return 0;
    for (i = 0; i < t->n; i = run_end(t, i))
        runs += (t->e[i].flags & mask) == mask;
    return runs;
}

size_t ddp_pt_ids(const ddp_pt *t) { return count_runs(t, 0); }
size_t ddp_pt_live_ids(const ddp_pt *t) { return count_runs(t, DDP_PT_LIVE); }

size_t ddp_pt_memory(const ddp_pt *t)
{
    size_t m = sizeof *t + t->cap * sizeof *t->e;
    if (t->bucket)
        m += (((size_t)1 << t->bits) + 1) * sizeof *t->bucket;
    return m;
}

/* The first entry of id's run, or t->n when no entry has id: a binary search within
 * id's bucket (a few entries, unless someone chose ids to fill one). */
static size_t find(const ddp_pt *t, const uint8_t *id)
{
    uint32_t b = lead(id, t->bits);
    size_t lo = t->bucket[b], hi = t->bucket[b + 1];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (memcmp(t->e[mid].id, id, DDP_PT_ID_BYTES) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < t->bucket[b + 1] && memcmp(t->e[lo].id, id, DDP_PT_ID_BYTES) == 0)
        return lo;
    return t->n;
}

size_t ddp_pt_unusable_packs(ddp_pt *t, const uint8_t *pack_gone)
{
    size_t i, flagged = 0;
    if (!t->sorted)
        return 0;
    for (i = 0; i < t->n; i++)
        if (pack_gone[t->e[i].pack] && !(t->e[i].flags & DDP_PT_UNUSABLE)) {
            t->e[i].flags |= DDP_PT_UNUSABLE;
            flagged++;
        }
    return flagged;
}

/* Flag the entries of id's run that match(x) as unusable; how many it flagged. */
static size_t flag_in_run(ddp_pt *t, const uint8_t *id, const ddp_pt_entry *want, int exact)
{
    size_t i, end, flagged = 0;
    if (!t->sorted)
        return 0;
    i = find(t, id);
    if (i == t->n)
        return 0;
    for (end = run_end(t, i); i < end; i++) {
        ddp_pt_entry *x = &t->e[i];
        if (x->pack != want->pack || (x->flags & DDP_PT_UNUSABLE))
            continue;
        if (exact && (x->offset != want->offset || x->stored != want->stored ||
                      x->raw != want->raw))
            continue;
        x->flags |= DDP_PT_UNUSABLE;
        flagged++;
    }
    return flagged;
}

size_t ddp_pt_set_unusable(ddp_pt *t, const uint8_t *id, uint32_t pack)
{
    ddp_pt_entry want = {{0}, pack, 0, 0, 0, 0, 0};
    return flag_in_run(t, id, &want, 0);
}

size_t ddp_pt_set_unusable_entry(ddp_pt *t, const uint8_t *id, uint32_t pack, uint32_t offset,
                                 uint32_t stored, uint32_t raw)
{
    ddp_pt_entry want = {{0}, pack, offset, stored, raw, 0, 0};
    return flag_in_run(t, id, &want, 1);
}

size_t ddp_pt_mark_live(ddp_pt *t, const uint8_t *records, size_t n, uint8_t *missing,
                        size_t cap)
{
    size_t k, absent = 0;
    if (!t->sorted)
        return n;
    for (k = 0; k < n; k++) {
        const uint8_t *id = records + k * DDP_PT_CHUNK_BYTES;
        size_t i = find(t, id);
        if (i == t->n) {
            if (absent < cap)
                memcpy(missing + absent * DDP_PT_ID_BYTES, id, DDP_PT_ID_BYTES);
            absent++;
            continue;
        }
        if (t->e[i].flags & DDP_PT_LIVE)
            continue;  /* the whole run is flagged already */
        do
            t->e[i].flags |= DDP_PT_LIVE;
        while (++i < t->n && memcmp(t->e[i].id, id, DDP_PT_ID_BYTES) == 0);
    }
    return absent;
}

/* Flags of this file's own, never seen by callers. */
#define FIRST         (1u << 16)  /* the earliest entry of its id in its pack */
#define FIRST_USABLE  (1u << 17)  /* the earliest usable entry of its id in its pack */

static int by_pack_seq(const void *a, const void *b)
{
    const ddp_pt_entry *x = *(const ddp_pt_entry *const *)a;
    const ddp_pt_entry *y = *(const ddp_pt_entry *const *)b;
    if (x->pack != y->pack)
        return x->pack < y->pack ? -1 : 1;
    return (x->seq > y->seq) - (x->seq < y->seq);
}

/* Set FIRST and FIRST_USABLE over the run [i, end): pairwise for the short runs of
 * ordinary repositories, by sorting for a run someone made long (one id listed again and
 * again must not make prune quadratic). */
static int mark_firsts(ddp_pt *t, size_t i, size_t end)
{
    size_t j, k;
    for (j = i; j < end; j++)
        t->e[j].flags &= ~(FIRST | FIRST_USABLE);
    if (end - i <= 16) {
        for (j = i; j < end; j++) {
            ddp_pt_entry *x = &t->e[j];
            int seen = 0, seen_usable = 0;
            for (k = i; k < j; k++)
                if (t->e[k].pack == x->pack) {
                    seen = 1;
                    seen_usable |= !(t->e[k].flags & DDP_PT_UNUSABLE);
                }
            if (!seen)
                x->flags |= FIRST;
            if (!seen_usable && !(x->flags & DDP_PT_UNUSABLE))
                x->flags |= FIRST_USABLE;
        }
        return DDP_PT_OK;
    }
    {
        ddp_pt_entry **order = malloc((end - i) * sizeof *order);
        if (!order)
            return DDP_PT_ENOMEM;
        for (j = i; j < end; j++)
            order[j - i] = &t->e[j];
        qsort(order, end - i, sizeof *order, by_pack_seq);
        for (j = 0; j < end - i; j = k) {
            int usable_seen = 0;
            order[j]->flags |= FIRST;
            for (k = j; k < end - i && order[k]->pack == order[j]->pack; k++)
                if (!usable_seen && !(order[k]->flags & DDP_PT_UNUSABLE)) {
                    order[k]->flags |= FIRST_USABLE;
                    usable_seen = 1;
                }
        }
        free(order);
    }
    return DDP_PT_OK;
}

int ddp_pt_live_bytes(ddp_pt *t, uint64_t *live)
{
    size_t i, j, end;
    if (!t->sorted)
        return DDP_PT_EORDER;
    memset(live, 0, t->packs * sizeof *live);
    for (i = 0; i < t->n; i = end) {
        end = run_end(t, i);
        if (!(t->e[i].flags & DDP_PT_LIVE))
            continue;
        if (mark_firsts(t, i, end) != DDP_PT_OK)
            return DDP_PT_ENOMEM;
        for (j = i; j < end; j++)
            if (t->e[j].flags & FIRST_USABLE)
                live[t->e[j].pack] += t->e[j].stored;
    }
    return DDP_PT_OK;
}

size_t ddp_pt_choose(ddp_pt *t, const uint32_t *rank, uint8_t *lost)
{
    size_t i, j, end, none = 0;
    if (!t->sorted)
        return 0;
    t->check_from = 0;
    for (i = 0; i < t->n; i = end) {
        size_t best = end = run_end(t, i);
        for (j = i; j < end; j++) {
            t->e[j].flags &= ~DDP_PT_CHOSEN;
            if (!(t->e[j].flags & DDP_PT_LIVE) || (t->e[j].flags & DDP_PT_UNUSABLE))
                continue;
            /* strictly greater: the earliest added of the best pack's entries wins */
            if (best == end || rank[t->e[j].pack] > rank[t->e[best].pack])
                best = j;
        }
        if (!(t->e[i].flags & DDP_PT_LIVE))
            continue;
        if (best == end) {
            if (none++ == 0 && lost)
                memcpy(lost, t->e[i].id, DDP_PT_ID_BYTES);
            continue;
        }
        t->e[best].flags |= DDP_PT_CHOSEN;
    }
    return none;
}

int ddp_pt_usage(ddp_pt *t, uint64_t *used, uint64_t *blobs)
{
    size_t i, j, end;
    if (!t->sorted)
        return DDP_PT_EORDER;
    memset(used, 0, t->packs * sizeof *used);
    memset(blobs, 0, t->packs * sizeof *blobs);
    for (i = 0; i < t->n; i = end) {
        end = run_end(t, i);
        if (mark_firsts(t, i, end) != DDP_PT_OK)
            return DDP_PT_ENOMEM;
        for (j = i; j < end; j++) {
            if (t->e[j].flags & DDP_PT_CHOSEN)
                used[t->e[j].pack] += t->e[j].stored;
            if (t->e[j].flags & FIRST)
                blobs[t->e[j].pack]++;
        }
    }
    return DDP_PT_OK;
}

static void put_record(uint8_t *out, const ddp_pt_entry *x, uint32_t pack)
{
    memcpy(out, x->id, DDP_PT_ID_BYTES);
    store_le32(out + 32, pack);
    store_le32(out + 36, x->offset);
    store_le32(out + 40, x->stored);
    store_le32(out + 44, x->raw);
}

/* Whether entries x and y name the same bytes (pack, offset, lengths). */
static int same_copy(const ddp_pt_entry *x, const ddp_pt_entry *y)
{
    return x->pack == y->pack && x->offset == y->offset && x->stored == y->stored &&
           x->raw == y->raw;
}

size_t ddp_pt_emit_unchecked(ddp_pt *t, uint8_t *out, size_t cap)
{
    size_t i, j, end, written = 0;
    if (!t->sorted)
        return 0;
    for (i = t->check_from; i < t->n && written < cap; i = end) {
        const ddp_pt_entry *chosen = NULL;
        int other = 0;
        end = run_end(t, i);
        for (j = i; j < end; j++)
            if (t->e[j].flags & DDP_PT_CHOSEN)
                chosen = &t->e[j];
        if (!chosen || (chosen->flags & DDP_PT_CHECKED))
            continue;
        /* another usable entry that names other bytes: the two cannot both be right */
        for (j = i; j < end && !other; j++)
            other = !(t->e[j].flags & DDP_PT_UNUSABLE) && !same_copy(&t->e[j], chosen);
        if (!other)
            continue;
        t->e[chosen - t->e].flags |= DDP_PT_CHECKED;
        put_record(out + written * DDP_PT_MOVE_BYTES, chosen, chosen->pack);
        written++;
    }
    t->check_from = i;
    return written;
}

static int by_pack_offset(const void *a, const void *b)
{
    const ddp_pt_entry *x = *(const ddp_pt_entry *const *)a;
    const ddp_pt_entry *y = *(const ddp_pt_entry *const *)b;
    if (x->pack != y->pack)
        return x->pack < y->pack ? -1 : 1;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    return (x->seq > y->seq) - (x->seq < y->seq);
}

size_t ddp_pt_emit_moving(const ddp_pt *t, const uint8_t *moving, uint8_t *out, size_t cap,
                          uint64_t *stored_sum)
{
    size_t i, count = 0;
    const ddp_pt_entry **order;
    *stored_sum = 0;
    if (!t->sorted)
        return 0;
    for (i = 0; i < t->n; i++)
        if ((t->e[i].flags & DDP_PT_CHOSEN) && moving[t->e[i].pack]) {
            count++;
            *stored_sum += t->e[i].stored;
        }
    if (count > cap || count == 0)
        return count;
    order = malloc(count * sizeof *order);
    if (!order)
        return SIZE_MAX;  /* documented by the wrapper: out of memory */
    for (i = 0, count = 0; i < t->n; i++)
        if ((t->e[i].flags & DDP_PT_CHOSEN) && moving[t->e[i].pack])
            order[count++] = &t->e[i];
    qsort(order, count, sizeof *order, by_pack_offset);
    for (i = 0; i < count; i++)
        put_record(out + i * DDP_PT_MOVE_BYTES, order[i], order[i]->pack);
    free(order);
    return count;
}

size_t ddp_pt_emit_kept(const ddp_pt *t, const uint32_t *number, uint8_t *out, size_t cap)
{
    size_t i, j, end, count = 0;
    if (!t->sorted)
        return 0;
    for (i = 0; i < t->n; i = end) {
        const ddp_pt_entry *keep = NULL;
        end = run_end(t, i);
        for (j = i; j < end && !keep; j++) {
            const ddp_pt_entry *x = &t->e[j];
            if (x->flags & DDP_PT_LIVE) {
                if ((x->flags & DDP_PT_CHOSEN) && number[x->pack] != UINT32_MAX)
                    keep = x;
            } else if (!(x->flags & DDP_PT_UNUSABLE) && number[x->pack] != UINT32_MAX) {
                keep = x;
            }
        }
        if (!keep)
            continue;
        if (count < cap)
            put_record(out + count * DDP_PT_MOVE_BYTES, keep, number[keep->pack]);
        count++;
    }
    return count;
}
