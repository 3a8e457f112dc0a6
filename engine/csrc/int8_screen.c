// The vocabulary screen's int8 product (engine/vocab_screen.py): for u8 activations xq (7-bit values, zero
// point `zero`) and s8 weights wq with a scale per output row,
//     out[m][n] = (sum_k xq[m][k] * wq[n][k] - zero * sum_k wq[n][k]) * scale[n]
// with the integer sum exact (int32), then one fp32 rounding in the conversion and one in the product.
//
// Weight layout (pack order): [N / 16][K / 4][16][4] bytes, so that one 32-byte load holds 4 consecutive inputs
// of 8 outputs. vpmaddubsw multiplies them by 4 broadcast activations and adds pairs into int16 (at most
// 2 * 127 * 127: 7-bit activations never saturate it), vpmaddwd against ones adds the pairs into int32.
// Each block of 16 outputs (10 KB at K = 640) stays in L1 while every tile of 4 rows passes over it, and
// those tiles prefetch the next block: 16 / 8 / 4 rows of the default model's screen 25.6 / 15.9 / 11.8 ->
// 23.6 / 14.1 / 10.0 ms (interleaved). One row streams its weights once, at memory's speed, without it.
#include <immintrin.h>
#include <stdint.h>

#include "chunk_pool.h"

#define NB 16
#define MR 4

static inline __attribute__((always_inline)) void tile(int mt, const uint8_t *x, int k_in, const int8_t *wb,
                                                       const int32_t *row_sum, const float *scale, int zero,
                                                       float *out, int n_out, const int8_t *next) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int k = 0; k < k_in; k += 4) {
        const __m256i w0 = _mm256_load_si256((const __m256i *)(wb + (size_t)k * NB));
        const __m256i w1 = _mm256_load_si256((const __m256i *)(wb + (size_t)k * NB + 32));
        if (next) _mm_prefetch((const char *)(next + (size_t)k * NB), _MM_HINT_T0);  // one line a step
#define STEP(r)                                                                                   \
        if (mt > r) {                                                                             \
            const __m256i xv = _mm256_set1_epi32(*(const int32_t *)(x + (size_t)r * k_in + k));   \
            a##r = _mm256_add_epi32(a##r, _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w0), ones)); \
            b##r = _mm256_add_epi32(b##r, _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w1), ones)); \
        }
        STEP(0) STEP(1) STEP(2) STEP(3)
#undef STEP
    }
    const __m256i zv = _mm256_set1_epi32(zero);
    const __m256i z0 = _mm256_mullo_epi32(zv, _mm256_loadu_si256((const __m256i *)row_sum));
    const __m256i z1 = _mm256_mullo_epi32(zv, _mm256_loadu_si256((const __m256i *)(row_sum + 8)));
    const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
#define STORE(r)                                                                                       \
    if (mt > r) {                                                                                      \
        float *o = out + (size_t)r * n_out;                                                            \
        _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(a##r, z0)), s0));        \
        _mm256_storeu_ps(o + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(b##r, z1)), s1));    \
    }
    STORE(0) STORE(1) STORE(2) STORE(3)
#undef STORE
}

// `tile` with the row count known at compile time: its branches leave the inner loop.
static void tile_rows(int mt, const uint8_t *x, int k_in, const int8_t *wb, const int32_t *row_sum,
                      const float *scale, int zero, float *out, int n_out, const int8_t *next) {
    switch (mt) {
        case 1: tile(1, x, k_in, wb, row_sum, scale, zero, out, n_out, next); break;
        case 2: tile(2, x, k_in, wb, row_sum, scale, zero, out, n_out, next); break;
        case 3: tile(3, x, k_in, wb, row_sum, scale, zero, out, n_out, next); break;
        default: tile(MR, x, k_in, wb, row_sum, scale, zero, out, n_out, next);
    }
}

// One row as a chunk_loop of ROW_CHUNK blocks a chunk (csrc/chunk_pool.c; see int8_linear.c).
#define ROW_CHUNK 64

typedef struct {
    const uint8_t *x;
    const int8_t *w;
    const int32_t *row_sum;
    const float *scale;
    int k_in, zero, blocks;
} RowJob;

// Chunk `i`'s ROW_CHUNK blocks of scores into `out`.
static void row_chunk(const void *job, int i, float *out) {
    const RowJob *j = job;
    const int first = i * ROW_CHUNK, last = first + ROW_CHUNK < j->blocks ? first + ROW_CHUNK : j->blocks;
    for (int nb = first; nb < last; nb++)
        tile(1, j->x, j->k_in, j->w + (size_t)nb * j->k_in * NB, j->row_sum + nb * NB, j->scale + nb * NB, j->zero,
             out + (nb - first) * NB, NB, NULL);
}

// x [m][k_in] u8, rows k_in bytes apart (k_in a multiple of 4); w packed as above (n_out a multiple of 16),
// 32-byte aligned; row_sum [n_out] = sum_k wq[n][k]; out [m][n_out].
int int8_screen(const uint8_t *x, int m, int k_in, int n_out, const int8_t *w, const int32_t *row_sum,
                const float *scale, int zero, float *out) {
    if (m < 1 || k_in % 4 || n_out % NB || ((uintptr_t)w & 31)) return 1;
    if (m == 1 && k_in <= 65536) {  // x stays mapped (see int8_linear.c)
        const RowJob job = {x, w, row_sum, scale, k_in, zero, n_out / NB};
        return chunk_loop(out, n_out, ROW_CHUNK * NB, row_chunk, &job, sizeof job);
    }
    // 64 blocks (640 KB of weights) at a time: a thread held up leaves its share to the other (int8_linear.c).
    // 16 / 8 rows 25.3 / 16.3 -> 24.0 / 15.7 ms (shuffled order; 4 rows the same).
#pragma omp parallel for schedule(dynamic, 64)
    for (int nb = 0; nb < n_out / NB; nb++) {
        const int8_t *wb = w + (size_t)nb * k_in * NB;
        const int8_t *next = nb + 1 < n_out / NB ? wb + (size_t)k_in * NB : NULL;
        for (int m0 = 0; m0 < m; m0 += MR) {
            const int mt = m - m0 < MR ? m - m0 : MR;
            tile_rows(mt, x + (size_t)m0 * k_in, k_in, wb, row_sum + nb * NB, scale + nb * NB, zero,
                      out + (size_t)m0 * n_out + nb * NB, n_out, next);
        }
    }
    return 0;
}
