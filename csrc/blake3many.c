/* blake3many.c - see blake3many.h for the contract. */
#include "blake3many.h"

#include <stdlib.h>
#include <string.h>

#define CHUNK_LEN 1024
#define BLOCK_LEN 64

/* Domain flags (BLAKE3 specification, table 3). */
#define CHUNK_START 1u
#define CHUNK_END 2u
#define PARENT 4u
#define ROOT 8u
#define KEYED_HASH 16u

static const uint32_t IV[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                               0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};

/* Message word order of each of the 7 rounds: the permutation
 * (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8) applied r times. */
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void store32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

/* The compression function on one block, keeping the 8-word chaining value. */
static void compress(uint32_t cv[8], const uint8_t block[BLOCK_LEN], uint32_t block_len,
                     uint64_t counter, uint32_t flags) {
    uint32_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load32(block + 4 * i);
    for (int i = 0; i < 8; i++) v[i] = cv[i];
    for (int i = 0; i < 4; i++) v[8 + i] = IV[i];
    v[12] = (uint32_t)counter;
    v[13] = (uint32_t)(counter >> 32);
    v[14] = block_len;
    v[15] = flags;
    for (int r = 0; r < 7; r++) {
        const uint8_t *s = SCHEDULE[r];
#define G(a, b, c, d, x, y)                  \
    do {                                     \
        v[a] = v[a] + v[b] + m[s[x]];        \
        v[d] = rotr(v[d] ^ v[a], 16);        \
        v[c] = v[c] + v[d];                  \
        v[b] = rotr(v[b] ^ v[c], 12);        \
        v[a] = v[a] + v[b] + m[s[y]];        \
        v[d] = rotr(v[d] ^ v[a], 8);         \
        v[c] = v[c] + v[d];                  \
        v[b] = rotr(v[b] ^ v[c], 7);         \
    } while (0)
        G(0, 4, 8, 12, 0, 1);
        G(1, 5, 9, 13, 2, 3);
        G(2, 6, 10, 14, 4, 5);
        G(3, 7, 11, 15, 6, 7);
        G(0, 5, 10, 15, 8, 9);
        G(1, 6, 11, 12, 10, 11);
        G(2, 7, 8, 13, 12, 13);
        G(3, 4, 9, 14, 14, 15);
#undef G
    }
    for (int i = 0; i < 8; i++) cv[i] = v[i] ^ v[i + 8];
}

static void store_cv(uint8_t *out, const uint32_t cv[8]) {
    for (int i = 0; i < 8; i++) store32(out + 4 * i, cv[i]);
}

/* One chunk (at most 1 KiB, possibly empty) with chunk counter `counter`: its chaining
 * value, or the hash itself when `root` (an input of one chunk). */
static void chunk_scalar(const uint32_t key[8], const uint8_t *p, size_t n, uint64_t counter,
                         uint32_t root, uint8_t *out) {
    uint32_t cv[8];
    memcpy(cv, key, sizeof cv);
    uint32_t flags = KEYED_HASH | CHUNK_START;
    while (n > BLOCK_LEN) {
        compress(cv, p, BLOCK_LEN, counter, flags);
        flags = KEYED_HASH;
        p += BLOCK_LEN;
        n -= BLOCK_LEN;
    }
    uint8_t last[BLOCK_LEN] = {0};
    memcpy(last, p, n);
    compress(cv, last, (uint32_t)n, counter, flags | CHUNK_END | root);
    store_cv(out, cv);
}

/* A unit of lane work: `msg` is a full chunk (16 blocks) or a parent's two child
 * chaining values (1 block); the result goes to out (32 bytes). */
typedef struct {
    const uint8_t *msg;
    uint8_t *out;
    uint64_t counter;
    uint32_t last_flags;
} b3_job;

typedef void (*lanes_fn)(const uint32_t key[8], const b3_job *jobs, size_t count,
                         size_t nblocks, uint32_t base, uint32_t first);

/* One lane: the portable implementation runs jobs through the scalar function. */
static void lanes1(const uint32_t key[8], const b3_job *jobs, size_t count, size_t nblocks,
                   uint32_t base, uint32_t first) {
    for (size_t j = 0; j < count; j++) {
        uint32_t cv[8];
        memcpy(cv, key, sizeof cv);
        for (size_t b = 0; b < nblocks; b++) {
            uint32_t f = base | (b == 0 ? first : 0) | (b + 1 == nblocks ? jobs[j].last_flags : 0);
            compress(cv, jobs[j].msg + BLOCK_LEN * b, BLOCK_LEN, jobs[j].counter, f);
        }
        store_cv(jobs[j].out, cv);
    }
}

/* The vector lanes need GCC's or Clang's vector extensions; another compiler (MSVC)
 * builds the portable implementation alone. */
#if defined(__GNUC__)
#define VECTOR_LANES 1
#define LANES 4
#define LANES_FN lanes4
#define LANES_TARGET
#include "blake3lanes.inc"
#undef LANES
#undef LANES_FN
#undef LANES_TARGET
#endif

#if defined(__x86_64__) && defined(__GNUC__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define X86_LANES 1
#include <immintrin.h>

/* Message words for 8 lanes: each lane's block is two rows of 8 words, and two 8x8
 * transposes (32-bit interleaves, 64-bit interleaves, 128-bit halves) turn rows into
 * word vectors. */
__attribute__((target("avx2"))) static void load8_avx2(__m256i m[16],
                                                       const uint8_t *const msg[8],
                                                       size_t offset) {
    for (int half = 0; half < 2; half++) {
        __m256i r[8], t[8], u[8];
        for (int j = 0; j < 8; j++)
            r[j] = _mm256_loadu_si256((const __m256i *)(msg[j] + offset + 32 * half));
        for (int j = 0; j < 8; j += 2) {
            t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
            t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
        }
        for (int g = 0; g < 8; g += 4) {
            u[g] = _mm256_unpacklo_epi64(t[g], t[g + 2]);
            u[g + 1] = _mm256_unpackhi_epi64(t[g], t[g + 2]);
            u[g + 2] = _mm256_unpacklo_epi64(t[g + 1], t[g + 3]);
            u[g + 3] = _mm256_unpackhi_epi64(t[g + 1], t[g + 3]);
        }
        for (int c = 0; c < 4; c++) {
            m[8 * half + c] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x20);
            m[8 * half + c + 4] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x31);
        }
    }
}

/* Message words for 16 lanes: a 16x16 transpose; interleaves within 128-bit lanes as
 * for AVX2, then a 4x4 transpose of 128-bit lanes in two rounds of shuffles. */
__attribute__((target("avx512f"))) static void load16_avx512(__m512i m[16],
                                                             const uint8_t *const msg[16],
                                                             size_t offset) {
    __m512i r[16], t[16], u[16];
    for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_si512((const void *)(msg[j] + offset));
    for (int j = 0; j < 16; j += 2) {
        t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
        t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
    }
    /* u[4 g + c], 128-bit lane L: rows 4g..4g+3 of word 4L + c. */
    for (int g = 0; g < 16; g += 4) {
        u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
        u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
        u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
        u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int c = 0; c < 4; c++) {
        __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
        __m512i x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
        __m512i x2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
        __m512i x3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
        m[c] = _mm512_shuffle_i32x4(x0, x2, _MM_SHUFFLE(2, 0, 2, 0));
        m[4 + c] = _mm512_shuffle_i32x4(x1, x3, _MM_SHUFFLE(2, 0, 2, 0));
        m[8 + c] = _mm512_shuffle_i32x4(x0, x2, _MM_SHUFFLE(3, 1, 3, 1));
        m[12 + c] = _mm512_shuffle_i32x4(x1, x3, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

/* Rotations by 16 and 8 bits move whole bytes: one shuffle instead of three operations
 * (AVX-512 has a rotate instruction and needs neither). */
__attribute__((target("avx2"))) static inline __m256i rot16_avx2(__m256i x) {
    return _mm256_shuffle_epi8(x, _mm256_set_epi8(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0,
                                                  3, 2, 13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6,
                                                  1, 0, 3, 2));
}

__attribute__((target("avx2"))) static inline __m256i rot8_avx2(__m256i x) {
    return _mm256_shuffle_epi8(x, _mm256_set_epi8(12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3,
                                                  2, 1, 12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5,
                                                  0, 3, 2, 1));
}

#define LANES 8
#define LANES_FN lanes8_avx2
#define LANES_ROT16(x) ((vec)rot16_avx2((__m256i)(x)))
#define LANES_ROT8(x) ((vec)rot8_avx2((__m256i)(x)))
#define LANES_TARGET __attribute__((target("avx2")))
#define LANES_LOAD(m, msg, offset) load8_avx2((__m256i *)(m), (msg), (offset))
#include "blake3lanes.inc"
#undef LANES
#undef LANES_FN
#undef LANES_TARGET
#undef LANES_LOAD
#undef LANES_ROT16
#undef LANES_ROT8

#define LANES 16
#define LANES_FN lanes16_avx512
#define LANES_TARGET __attribute__((target("avx512f")))
#define LANES_LOAD(m, msg, offset) load16_avx512((__m512i *)(m), (msg), (offset))
#include "blake3lanes.inc"
#undef LANES
#undef LANES_FN
#undef LANES_TARGET
#undef LANES_LOAD
#endif

int ddp_b3_available(int impl) {
    switch (impl) {
    case DDP_B3_PORTABLE:
        return 1;
#ifdef VECTOR_LANES
    case DDP_B3_LANES4:
        return 1;
#endif
#ifdef X86_LANES
    case DDP_B3_AVX2:
        return __builtin_cpu_supports("avx2");
    case DDP_B3_AVX512:
        return __builtin_cpu_supports("avx512f");
#endif
    default:
        return 0;
    }
}

int ddp_b3_best(void) {
    for (int impl = DDP_B3_AVX512; impl > DDP_B3_PORTABLE; impl--)
        if (ddp_b3_available(impl)) return impl;
    return DDP_B3_PORTABLE;
}

/* Jobs are queued and run `width` at a time. */
typedef struct {
    lanes_fn run;
    size_t width;
    const uint32_t *key;
    size_t nblocks;
    uint32_t base, first;
    size_t count;
    b3_job jobs[16];
} b3_queue;

static void queue_flush(b3_queue *q) {
    if (q->count) q->run(q->key, q->jobs, q->count, q->nblocks, q->base, q->first);
    q->count = 0;
}

static void queue_push(b3_queue *q, const uint8_t *msg, uint8_t *out, uint64_t counter,
                       uint32_t last_flags) {
    b3_job *job = &q->jobs[q->count++];
    job->msg = msg;
    job->out = out;
    job->counter = counter;
    job->last_flags = last_flags;
    if (q->count == q->width) queue_flush(q);
}

int ddp_b3_keyed_many(int impl, const uint8_t *key, size_t n, const uint8_t *const *src,
                      const size_t *len, uint8_t *out) {
    if (impl == DDP_B3_BEST) impl = ddp_b3_best();
    if (!ddp_b3_available(impl)) return -1;
    b3_queue q = {.run = lanes1, .width = 1};
    switch (impl) {
#ifdef VECTOR_LANES
    case DDP_B3_LANES4:
        q.run = lanes4;
        q.width = 4;
        break;
#endif
#ifdef X86_LANES
    case DDP_B3_AVX2:
        q.run = lanes8_avx2;
        q.width = 8;
        break;
    case DDP_B3_AVX512:
        q.run = lanes16_avx512;
        q.width = 16;
        break;
#endif
    }
    uint32_t key_words[8];
    for (int i = 0; i < 8; i++) key_words[i] = load32(key + 4 * i);
    q.key = key_words;

    /* Scratch: the chaining value of every chunk of every input of more than one chunk
     * (where each input's tree is then reduced in place), and where each input starts. */
    size_t chunks_total = 0;
    for (size_t i = 0; i < n; i++)
        if (len[i] > CHUNK_LEN) chunks_total += (len[i] + CHUNK_LEN - 1) / CHUNK_LEN;
    uint8_t *cvs = malloc(chunks_total ? chunks_total * DDP_B3_OUT_BYTES : 1);
    size_t *count = malloc((n ? n : 1) * sizeof(size_t));
    if (!cvs || !count) {
        free(cvs);
        free(count);
        return -1;
    }

    /* Chunks: full ones in lanes (a one-chunk input's with ROOT), the short last chunk of
     * each input alone. */
    q.nblocks = CHUNK_LEN / BLOCK_LEN;
    q.base = KEYED_HASH;
    q.first = CHUNK_START;
    uint8_t *tree = cvs;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = src[i];
        size_t chunks = len[i] > CHUNK_LEN ? (len[i] + CHUNK_LEN - 1) / CHUNK_LEN : 1;
        count[i] = chunks;
        if (chunks == 1) {
            if (len[i] == CHUNK_LEN)
                queue_push(&q, p, out + DDP_B3_OUT_BYTES * i, 0, CHUNK_END | ROOT);
            else
                chunk_scalar(key_words, p, len[i], 0, ROOT, out + DDP_B3_OUT_BYTES * i);
            continue;
        }
        for (size_t c = 0; c < chunks; c++) {
            size_t start = c * CHUNK_LEN;
            uint8_t *cv = tree + DDP_B3_OUT_BYTES * c;
            if (len[i] - start >= CHUNK_LEN)
                queue_push(&q, p + start, cv, c, CHUNK_END);
            else
                chunk_scalar(key_words, p + start, len[i] - start, c, 0, cv);
        }
        tree += DDP_B3_OUT_BYTES * chunks;
    }
    queue_flush(&q);

    /* Parents, one tree level at a time across all inputs: pairing chaining values from
     * the left and carrying an odd last one up a level builds BLAKE3's left-balanced tree.
     * A level's parents overwrite the front of their input's array (each job reads slots
     * 2k and 2k+1 and writes slot k, and jobs run in order); the odd one is carried after
     * the level has run. The parent that is left alone is the root: the hash. */
    q.nblocks = 1;
    q.base = KEYED_HASH | PARENT;
    q.first = 0;
    for (int more = 1; more;) {
        more = 0;
        tree = cvs;
        for (size_t i = 0; i < n; i++) {
            size_t full = len[i] > CHUNK_LEN ? (len[i] + CHUNK_LEN - 1) / CHUNK_LEN : 0;
            size_t c = count[i];
            if (c == 2) {
                queue_push(&q, tree, out + DDP_B3_OUT_BYTES * i, 0, ROOT);
            } else if (c > 2) {
                for (size_t k = 0; k < c / 2; k++)
                    queue_push(&q, tree + 2 * DDP_B3_OUT_BYTES * k, tree + DDP_B3_OUT_BYTES * k,
                               0, 0);
                more = 1;
            }
            tree += DDP_B3_OUT_BYTES * full;
        }
        queue_flush(&q);
        tree = cvs;
        for (size_t i = 0; i < n; i++) {
            size_t full = len[i] > CHUNK_LEN ? (len[i] + CHUNK_LEN - 1) / CHUNK_LEN : 0;
            size_t c = count[i];
            if (c > 2 && c % 2)
                memcpy(tree + DDP_B3_OUT_BYTES * (c / 2), tree + DDP_B3_OUT_BYTES * (c - 1),
                       DDP_B3_OUT_BYTES);
            if (c >= 2) count[i] = c > 2 ? (c + 1) / 2 : 1;
            tree += DDP_B3_OUT_BYTES * full;
        }
    }
    free(cvs);
    free(count);
    return 0;
}
