// y[M, N] = x[M, K] @ W.T in fp32, for a weight stored as int8 with a scale and an offset per group of G
// inputs: W[n, k] = fma(q[n, k], a[n, k / G], b[n, k / G]), rebuilt exactly in fp32 (GGUF's block formats
// dequantize to exactly this value, see engine/int8_weights.py).
//
// Layout (int8_weights.Int8Linear): q [N / 16][K][16] int8, a and b [N / 16][K / G][16] fp32 (b NULL:
// zeros). Up to 4 rows rebuild each weight in registers and use it at once (`direct`). More rows rebuild
// each block of 16 outputs, KC inputs at a time, into a buffer that stays in L1, then multiply it by up to
// 6 rows at a time: the classic 6 x 16 AVX2 micro-kernel (`tile`, 12 accumulators); the rebuild is then
// paid once per block whatever the number of rows. Either way the weights cross from memory as int8.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "chunk_pool.h"

#define NB 16
#define MR 6
#define KC 128
#define DIRECT_ROWS 4
#define MC 96  // rows per chunk (tuned with KC on 2-core Zen: 512 rows -4%, 2048 rows -7% against 48 and 256)

static const float ZEROS[NB] = {0};  // the offsets of a weight without any (b == NULL)

static inline __attribute__((always_inline)) void tile(int mt, const float *xt, const float *w, int kc,
                                                       float *y, int n_out, int first) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
#define LOAD(r)                                                       \
    if (mt > r && !first) {                                           \
        a##r = _mm256_loadu_ps(y + (size_t)r * n_out);                \
        b##r = _mm256_loadu_ps(y + (size_t)r * n_out + 8);            \
    }
    LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5)
    for (int k = 0; k < kc; k++) {
        const __m256 w0 = _mm256_load_ps(w + k * NB), w1 = _mm256_load_ps(w + k * NB + 8);
        const float *xk = xt + k * mt;
#define STEP(r)                                                       \
        if (mt > r) {                                                 \
            const __m256 xv = _mm256_broadcast_ss(xk + r);            \
            a##r = _mm256_fmadd_ps(xv, w0, a##r);                     \
            b##r = _mm256_fmadd_ps(xv, w1, b##r);                     \
        }
        STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
    }
#define STORE(r)                                                      \
    if (mt > r) {                                                     \
        _mm256_storeu_ps(y + (size_t)r * n_out, a##r);                \
        _mm256_storeu_ps(y + (size_t)r * n_out + 8, b##r);            \
    }
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
}

static void tile_rows(int mt, const float *xt, const float *w, int kc, float *y, int n_out, int first) {
    // mt as a constant in each call: the accumulators then live in registers
    switch (mt) {
        case 1: tile(1, xt, w, kc, y, n_out, first); break;
        case 2: tile(2, xt, w, kc, y, n_out, first); break;
        case 3: tile(3, xt, w, kc, y, n_out, first); break;
        case 4: tile(4, xt, w, kc, y, n_out, first); break;
        case 5: tile(5, xt, w, kc, y, n_out, first); break;
        default: tile(6, xt, w, kc, y, n_out, first); break;
    }
}


// The 16 weights of one input in a block, rebuilt from their int8 values `qk` and the group's scales `s0`,
// `s1` and offsets `o0`, `o1` (16-byte load: exactly one row of the packed q).
static inline __attribute__((always_inline)) void rebuild16(const int8_t *qk, __m256 s0, __m256 s1, __m256 o0,
                                                            __m256 o1, __m256 *w0, __m256 *w1) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qk);
    *w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s0, o0);
    *w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q))), s1, o1);
}

// Up to 4 rows: each weight is rebuilt in registers and used at once (no buffer); 8 accumulators, the
// group's scales and offsets and the two rebuilt vectors fit AVX2's 16 registers.
static inline __attribute__((always_inline)) void direct(int mt, const float *xt, const int8_t *qb, const float *ab,
                                                         const float *bb, int k_in, int group, float *y, int n_out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int g0 = 0; g0 < k_in; g0 += group) {
        const float *ag = ab + g0 / group * NB, *bg = bb ? bb + g0 / group * NB : ZEROS;
        const __m256 s0 = _mm256_loadu_ps(ag), s1 = _mm256_loadu_ps(ag + 8);
        const __m256 o0 = _mm256_loadu_ps(bg), o1 = _mm256_loadu_ps(bg + 8);
        for (int k = g0; k < g0 + group; k++) {
            __m256 w0, w1;
            rebuild16(qb + (size_t)k * NB, s0, s1, o0, o1, &w0, &w1);
            const float *xk = xt + k * mt;
            STEP(0) STEP(1) STEP(2) STEP(3)
        }
    }
    STORE(0) STORE(1) STORE(2) STORE(3)
}

// One row: `direct` would chain every FMA of an output on the one before (4 cycles each); four chains, for
// alternate inputs, hide that latency (groups are even), and a prefetch 1 KB ahead keeps the weights coming.
// Decode body of the default model at one row 17.9 / 17.6 -> 16.8 / 16.1 ms (two interleaved runs).
static void direct_one_row(const float *x, const int8_t *qb, const float *ab, const float *bb, int k_in, int group,
                           float *y) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int g0 = 0; g0 < k_in; g0 += group) {
        const float *ag = ab + g0 / group * NB, *bg = bb ? bb + g0 / group * NB : ZEROS;
        const __m256 s0 = _mm256_loadu_ps(ag), s1 = _mm256_loadu_ps(ag + 8);
        const __m256 o0 = _mm256_loadu_ps(bg), o1 = _mm256_loadu_ps(bg + 8);
        for (int k = g0; k < g0 + group; k += 2) {
            if (!(k & 3)) _mm_prefetch((const char *)(qb + (size_t)(k + 64) * NB), _MM_HINT_T0);  // one line a 4 k
            __m256 w0, w1, w2, w3;
            rebuild16(qb + (size_t)k * NB, s0, s1, o0, o1, &w0, &w1);
            rebuild16(qb + (size_t)(k + 1) * NB, s0, s1, o0, o1, &w2, &w3);
            const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
            a0 = _mm256_fmadd_ps(x0, w0, a0);
            b0 = _mm256_fmadd_ps(x0, w1, b0);
            a1 = _mm256_fmadd_ps(x1, w2, a1);
            b1 = _mm256_fmadd_ps(x1, w3, b1);
        }
    }
    _mm256_storeu_ps(y, _mm256_add_ps(a0, a1));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(b0, b1));
}

static void direct_rows(int mt, const float *xt, const int8_t *qb, const float *ab, const float *bb, int k_in,
                        int group, float *y, int n_out) {
    switch (mt) {
        case 1:
            if (group % 2 == 0) {
                direct_one_row(xt, qb, ab, bb, k_in, group, y);
                break;
            }
            direct(1, xt, qb, ab, bb, k_in, group, y, n_out);
            break;
        case 2: direct(2, xt, qb, ab, bb, k_in, group, y, n_out); break;
        case 3: direct(3, xt, qb, ab, bb, k_in, group, y, n_out); break;
        default: direct(4, xt, qb, ab, bb, k_in, group, y, n_out); break;
    }
}

// Weights of one block (16 outputs), `kc` inputs from `qb`, rebuilt into `w` [kc][16]; `ab`, `bb` at the
// chunk's first group (bb NULL: no offsets). KC is a multiple of every group size.
static void rebuild(float *w, const int8_t *qb, const float *ab, const float *bb, int kc, int group) {
    for (int g0 = 0; g0 < kc; g0 += group) {
        const float *ag = ab + g0 / group * NB, *bg = bb ? bb + g0 / group * NB : ZEROS;
        const __m256 s0 = _mm256_loadu_ps(ag), s1 = _mm256_loadu_ps(ag + 8);
        const __m256 o0 = _mm256_loadu_ps(bg), o1 = _mm256_loadu_ps(bg + 8);
        // kc is a multiple of the group, so `k < kc` never ends the loop; without it the build measured 4-7%
        // slower at 512 rows (gcc 12).
        for (int k = g0; k < g0 + group && k < kc; k++) {
            __m256 w0, w1;
            rebuild16(qb + (size_t)k * NB, s0, s1, o0, o1, &w0, &w1);
            _mm256_store_ps(w + k * NB, w0);
            _mm256_store_ps(w + k * NB + 8, w1);
        }
    }
}

// One row (a decode step at one stream) goes as a chunk_loop (csrc/chunk_pool.c) of ROW_CHUNK blocks a chunk:
// the serving stack's processes wake on the engine's cores once per token or more.
#define ROW_CHUNK 4

typedef struct {
    const float *x, *a, *b;
    const int8_t *q;
    int k_in, group, blocks;
} RowJob;

// Chunk `i`'s ROW_CHUNK blocks of outputs into `out`.
static void row_chunk(const void *job, int i, float *out) {
    const RowJob *j = job;
    const int groups = j->k_in / j->group, first = i * ROW_CHUNK;
    const int last = first + ROW_CHUNK < j->blocks ? first + ROW_CHUNK : j->blocks;
    for (int nb = first; nb < last; nb++)
        direct_rows(1, j->x, j->q + (size_t)nb * j->k_in * NB, j->a + (size_t)nb * groups * NB,
                    j->b ? j->b + (size_t)nb * groups * NB : NULL, j->k_in, j->group, out + (nb - first) * NB, NB);
}

int int8_linear(const float *x, int m, int k_in, int n_out, int group, const int8_t *q, const float *a,
                const float *b, float *y) {
    if (n_out % NB || k_in % group || KC % group || m < 1) return 1;
    // A helper may still read x after the loop (chunk_pool.c): x must stay mapped, as heap blocks below glibc's
    // mmap threshold (128 KB) do.
    if (m == 1 && k_in <= 16384) {
        const RowJob job = {x, a, b, q, k_in, group, n_out / NB};
        return chunk_loop(y, n_out, ROW_CHUNK * NB, row_chunk, &job, sizeof job);
    }
    // x per tile of MR rows as [K][rows]: one step's broadcasts share a cache line
    float *xt = (float *)aligned_alloc(64, sizeof(float) * (((size_t)m * k_in + 15) / 16 * 16));
    if (!xt) return 2;
    const int groups = k_in / group;
#pragma omp parallel
    {
        float w[KC * NB] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int k = 0; k < k_in; k++)
            for (int m0 = 0; m0 < m; m0 += MR) {
                const int mt = m - m0 < MR ? m - m0 : MR;
                for (int r = 0; r < mt; r++)
                    xt[(size_t)m0 * k_in + (size_t)k * mt + r] = x[(size_t)(m0 + r) * k_in + k];
            }
        if (m <= DIRECT_ROWS) {  // streams its weights: each thread one run of blocks
#pragma omp for schedule(static)
            for (int nb = 0; nb < n_out / NB; nb++)
                direct_rows(m, xt, q + (size_t)nb * k_in * NB, a + (size_t)nb * groups * NB,
                            b ? b + (size_t)nb * groups * NB : NULL, k_in, group, y + nb * NB, n_out);
        }
        // Rows in chunks of MC whose x stays in each core's L2 while every block of weights passes over it;
        // a block's weights are rebuilt once per chunk. Blocks go out in shrinking runs (guided): a thread held up
        // (the stack's processes take a SCHED_IDLE helper's core) leaves its tail to the other rather than a wait
        // at the barrier. Body at 8 / 16 / 512 rows, one run in shuffled order: 24.5 / 27.5 / 895 -> 20.5 / 27.0 /
        // 827 ms; when neither lags, the same (17.6 / 28.4 -> 17.7 / 28.1). Blocks two at a time lost ~10% at 8.
        for (int c0 = 0; m > DIRECT_ROWS && c0 < m; c0 += MC) {
            const int c1 = m - c0 < MC ? m : c0 + MC;
#pragma omp for schedule(guided, 2)
            for (int nb = 0; nb < n_out / NB; nb++) {
                const int8_t *qb = q + (size_t)nb * k_in * NB;
                const float *ab = a + (size_t)nb * groups * NB, *bb = b ? b + (size_t)nb * groups * NB : NULL;
                for (int k0 = 0; k0 < k_in; k0 += KC) {
                    const int kc = k_in - k0 < KC ? k_in - k0 : KC;
                    rebuild(w, qb + (size_t)k0 * NB, ab + k0 / group * NB, bb ? bb + k0 / group * NB : NULL, kc, group);
                    for (int m0 = c0; m0 < c1; m0 += MR) {
                        const int mt = m - m0 < MR ? m - m0 : MR;
                        tile_rows(mt, xt + (size_t)m0 * k_in + (size_t)k0 * mt, w, kc,
                                  y + (size_t)m0 * n_out + nb * NB, n_out, k0 == 0);
                    }
                }
            }
        }
    }
    free(xt);
    return 0;
}
