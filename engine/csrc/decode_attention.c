// One decode step's attention: each row has one new query per head and attends over its own slot of the
// KV cache, keys lo..pos of that row (lo > 0 under a sliding window), in fp32.
//
// Cache layout (engine/model.py): k, v [slots][kv_heads][max_seq_len][d]; row i reads slot i. The heads of
// one KV head (grouped-query attention) are scored together, so each key and value crosses from memory
// once per row: at decode the cache reads are the whole cost (the arithmetic is a few FMAs per value read).
// The softmax is computed online, a block of keys at a time (flash attention), so no buffer grows with the
// context. The group size is a compile-time constant (`attend`, dispatched by `attend_group`): the scores of
// a key for all heads, and a slice of every head's output, then live in registers.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vector_math.h"

#define BLOCK 16  // keys scored before their values are summed: 16 values (16 KB at d = 256) stay in L1
#define MAX_GROUP 8

// acc[g][j0 .. j0 + 8W) += sum_t p[g][t] * v[t][j0 ..], the G x W vectors held in registers across the block.
static inline __attribute__((always_inline)) void add_values(int G, int W, float *acc, const float *p,
                                                             const float *values, int tb, int d, int j0) {
    __m256 c[MAX_GROUP][2];
    for (int g = 0; g < G; g++)
        for (int w = 0; w < W; w++) c[g][w] = _mm256_loadu_ps(acc + (size_t)g * d + j0 + 8 * w);
    for (int t = 0; t < tb; t++) {
        __m256 v[2];
        for (int w = 0; w < W; w++) v[w] = _mm256_loadu_ps(values + (size_t)t * d + j0 + 8 * w);
        for (int g = 0; g < G; g++) {
            const __m256 pg = _mm256_broadcast_ss(p + g * BLOCK + t);
            for (int w = 0; w < W; w++) c[g][w] = _mm256_fmadd_ps(pg, v[w], c[g][w]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int w = 0; w < W; w++) _mm256_storeu_ps(acc + (size_t)g * d + j0 + 8 * w, c[g][w]);
}

// One row's attention for one KV head and its G query heads `qh` [G][d], keys and values `k`, `v` [lo..hi];
// `m`, `l`, `acc` and `s` are scratch of G, G, G x d and G x BLOCK floats; out [G][d].
static inline __attribute__((always_inline)) void attend(int G, const float *qh, const float *k, const float *v,
                                                         int lo, int hi, int d, float softmax_scale, float *m,
                                                         float *l, float *acc, float *s, float *out) {
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    for (size_t j = 0; j < (size_t)G * d; j++) acc[j] = 0.f;
    for (int t0 = lo; t0 <= hi; t0 += BLOCK) {
        const int tb = hi + 1 - t0 < BLOCK ? hi + 1 - t0 : BLOCK;
        for (int t = 0; t < tb; t++) {  // scores: each key is read once for all G heads
            const float *key = k + (size_t)(t0 + t) * d;
            __m256 a[MAX_GROUP];
            for (int g = 0; g < G; g++) a[g] = _mm256_setzero_ps();
            int j = 0;
            for (; j + 8 <= d; j += 8) {
                const __m256 kv = _mm256_loadu_ps(key + j);
                for (int g = 0; g < G; g++)
                    a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + (size_t)g * d + j), kv, a[g]);
            }
            for (int g = 0; g < G; g++) {
                float sum = hsum(a[g]);
                for (int jj = j; jj < d; jj++) sum += qh[(size_t)g * d + jj] * key[jj];
                s[g * BLOCK + t] = sum * softmax_scale;
            }
        }
        for (int g = 0; g < G; g++) {  // online softmax: rescale what was summed when the maximum grows
            float *sg = s + g * BLOCK, top = m[g];
            for (int t = 0; t < tb; t++) top = sg[t] > top ? sg[t] : top;
            const float rescale = expf(m[g] - top);  // 0 for the first block (m = -inf)
            if (rescale != 1.f) {
                l[g] *= rescale;
                const __m256 r = _mm256_set1_ps(rescale);
                int j = 0;
                float *ag = acc + (size_t)g * d;
                for (; j + 8 <= d; j += 8) _mm256_storeu_ps(ag + j, _mm256_mul_ps(r, _mm256_loadu_ps(ag + j)));
                for (; j < d; j++) ag[j] *= rescale;
            }
            int t = 0;
            __m256 total = _mm256_setzero_ps();
            for (; t + 8 <= tb; t += 8) {
                const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + t), _mm256_set1_ps(top)));
                _mm256_storeu_ps(sg + t, e);
                total = _mm256_add_ps(total, e);
            }
            l[g] += hsum(total);
            for (; t < tb; t++) {
                sg[t] = expf(sg[t] - top);
                l[g] += sg[t];
            }
            m[g] = top;
        }
        const float *values = v + (size_t)t0 * d;
        const int W = G <= 4 ? 2 : 1;  // G x W accumulators, plus the values and a broadcast, in 16 registers
        int j0 = 0;
        for (; j0 + 8 * W <= d; j0 += 8 * W) add_values(G, W, acc, s, values, tb, d, j0);
        for (; j0 + 8 <= d; j0 += 8) add_values(G, 1, acc, s, values, tb, d, j0);
        for (; j0 < d; j0++)
            for (int t = 0; t < tb; t++)
                for (int g = 0; g < G; g++) acc[(size_t)g * d + j0] += s[g * BLOCK + t] * values[(size_t)t * d + j0];
    }
    for (int g = 0; g < G; g++)
        for (int j = 0; j < d; j++) out[(size_t)g * d + j] = acc[(size_t)g * d + j] / l[g];
}

#define ATTEND_ARGS qh, k, v, lo, hi, d, softmax_scale, m, l, acc, s, out
static void attend_group(int group, const float *qh, const float *k, const float *v, int lo, int hi, int d,
                         float softmax_scale, float *m, float *l, float *acc, float *s, float *out) {
    switch (group) {
        case 1: attend(1, ATTEND_ARGS); break;
        case 2: attend(2, ATTEND_ARGS); break;
        case 3: attend(3, ATTEND_ARGS); break;
        case 4: attend(4, ATTEND_ARGS); break;
        case 5: attend(5, ATTEND_ARGS); break;
        case 6: attend(6, ATTEND_ARGS); break;
        case 7: attend(7, ATTEND_ARGS); break;
        default: attend(8, ATTEND_ARGS); break;
    }
}

// q [n][heads][d] with rows `q_stride` floats apart, out [n][heads][d] contiguous, positions [n]; `window` 0
// for full attention, else a key is seen when pos - window < key <= pos; at most MAX_GROUP heads per KV head.
// Returns 0, or non-zero on bad arguments or no memory.
int decode_attention(const float *q, int64_t q_stride, int n, int heads, int kv_heads, int d, const float *k_cache,
                     const float *v_cache, int max_seq_len, const int64_t *positions, int window, float softmax_scale,
                     float *out) {
    if (n < 1 || kv_heads < 1 || heads % kv_heads || heads / kv_heads > MAX_GROUP || d < 1) return 1;
    for (int i = 0; i < n; i++)
        if (positions[i] < 0 || positions[i] >= max_seq_len) return 1;
    const int group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel if (n * kv_heads > 1)
    {
        // per thread: running max, sum and output of each head of a group, and a block of scores
        float *m = malloc(sizeof(float) * group * (2 + d + BLOCK));
        if (!m) {
#pragma omp atomic write
            failed = 2;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < n * kv_heads; task++) {
            if (!m) continue;
            const int i = task / kv_heads, h = task % kv_heads;
            float *l = m + group, *acc = l + group, *s = acc + (size_t)group * d;
            const int hi = (int)positions[i];
            const int lo = window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0;
            const size_t base = ((size_t)i * kv_heads + h) * max_seq_len * d;
            attend_group(group, q + i * q_stride + (size_t)h * group * d, k_cache + base, v_cache + base, lo, hi, d,
                         softmax_scale, m, l, acc, s, out + ((size_t)i * heads + (size_t)h * group) * d);
        }
        free(m);
    }
    return failed;
}
