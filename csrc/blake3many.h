/*
 * blake3many.h - keyed BLAKE3 (32-byte output) of many inputs in one call, for chunk ids.
 *
 * Written from the BLAKE3 specification (Aumasson, Neves, O'Connor, Wilcox-O'Hearn, 2020):
 * 1 KiB chunks of 64-byte blocks chained through the compression function, chunk
 * chaining values merged in a left-balanced binary tree, keyed mode (KEYED_HASH flag,
 * the key as every chunk's and parent's starting chaining value).
 *
 * Why our own: the blake3 package hashes one input per call while holding the GIL for
 * small inputs, and its SIMD runs across the 1 KiB chunks of one input, so a 4 KiB page
 * fills only 4 of its lanes. Here the lanes run across inputs: full 1 KiB chunks of all
 * the inputs of a batch are compressed W at a time (W = 16 with AVX-512, 8 with AVX2, 4
 * otherwise), and so are the parent nodes of each tree level. The result is the same
 * BLAKE3 (tests compare every implementation with the blake3 package).
 *
 * Plain C99 plus GCC/Clang vector extensions (another compiler gets the portable code
 * alone); no Python.h. Thread safe (no state but the
 * implementation chosen once, which every thread chooses the same).
 */
#ifndef DEDUPE_BLAKE3MANY_H
#define DEDUPE_BLAKE3MANY_H

#include <stddef.h>
#include <stdint.h>

#define DDP_B3_KEY_BYTES 32
#define DDP_B3_OUT_BYTES 32

/* Implementations, widest first; ddp_b3_available says which this CPU runs. */
#define DDP_B3_PORTABLE 0 /* one input at a time, no vectors */
#define DDP_B3_LANES4 1   /* 4 lanes: SSE2, NEON or whatever GCC/Clang target */
#define DDP_B3_AVX2 2     /* 8 lanes (x86-64 with AVX2) */
#define DDP_B3_AVX512 3   /* 16 lanes (x86-64 with AVX-512F) */
#define DDP_B3_BEST (-1)  /* the widest available */

/*
 * out[32 i .. 32 i + 31] = BLAKE3(key, src[i][0 .. len[i]]) for i < n, with the
 * implementation `impl` (DDP_B3_BEST normally). Returns 0, or -1 if scratch memory
 * (32 bytes per 1 KiB of input) could not be allocated or impl is not available.
 */
int ddp_b3_keyed_many(int impl, const uint8_t *key, size_t n, const uint8_t *const *src,
                      const size_t *len, uint8_t *out);

/* Whether `impl` runs on this CPU (DDP_B3_PORTABLE always does). */
int ddp_b3_available(int impl);

/* The implementation DDP_B3_BEST picks. */
int ddp_b3_best(void);

#endif
