// One decode step's attention: each row has one new query per head and attends over its own slot of the
// KV cache, keys lo..pos of that row (lo > 0 under a sliding window), in fp32.
//
// Cache layout (engine/model.py): k, v [slots][kv_heads][max_seq_len][d]; row i reads slot i. The heads of
// one KV head (grouped-query attention) are scored together, so each key and value crosses from memory
// once per row: at decode the cache reads are the whole cost (the arithmetic is a few FMAs per value read).
// The softmax is computed online, a block of keys at a time (flash attention), so no buffer grows with the
// context.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 64  // keys scored before their values are summed

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int i = 0;
    for (; i + 16 <= d; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= d; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum(_mm256_add_ps(s0, s1));
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float *y, float a, const float *x, int d) {  // y += a * x
    const __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < d; i++) y[i] += a * x[i];
}

static inline void scale(float *y, float a, int d) {
    const __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(av, _mm256_loadu_ps(y + i)));
    for (; i < d; i++) y[i] *= a;
}

// q [n][heads][d] with rows `q_stride` floats apart, out [n][heads][d] contiguous, positions [n]; `window` 0
// for full attention, else a key is seen when pos - window < key <= pos. Returns 0, or non-zero on bad
// arguments or no memory.
int decode_attention(const float *q, int64_t q_stride, int n, int heads, int kv_heads, int d, const float *k_cache,
                     const float *v_cache, int max_seq_len, const int64_t *positions, int window, float softmax_scale,
                     float *out) {
    if (n < 1 || kv_heads < 1 || heads % kv_heads || d < 1) return 1;
    for (int i = 0; i < n; i++)
        if (positions[i] < 0 || positions[i] >= max_seq_len) return 1;
    const int group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel
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
            const size_t base = ((size_t)i * kv_heads + h) * max_seq_len;
            const float *qh = q + i * q_stride + (size_t)h * group * d;
            for (int g = 0; g < group; g++) {
                m[g] = -INFINITY;
                l[g] = 0.f;
            }
            for (size_t j = 0; j < (size_t)group * d; j++) acc[j] = 0.f;
            for (int t0 = lo; t0 <= hi; t0 += BLOCK) {
                const int tb = hi + 1 - t0 < BLOCK ? hi + 1 - t0 : BLOCK;
                for (int t = 0; t < tb; t++) {
                    const float *key = k_cache + (base + t0 + t) * d;
                    for (int g = 0; g < group; g++) s[g * BLOCK + t] = dot(qh + (size_t)g * d, key, d) * softmax_scale;
                }
                for (int g = 0; g < group; g++) {
                    float *sg = s + g * BLOCK, top = m[g];
                    for (int t = 0; t < tb; t++) top = sg[t] > top ? sg[t] : top;
                    const float rescale = expf(m[g] - top);  // 0 for the first block (m = -inf)
                    if (rescale != 1.f) {
                        l[g] *= rescale;
                        scale(acc + (size_t)g * d, rescale, d);
                    }
                    for (int t = 0; t < tb; t++) {
                        sg[t] = expf(sg[t] - top);
                        l[g] += sg[t];
                    }
                    m[g] = top;
                }
                for (int t = 0; t < tb; t++) {
                    const float *value = v_cache + (base + t0 + t) * d;
                    for (int g = 0; g < group; g++) axpy(acc + (size_t)g * d, s[g * BLOCK + t], value, d);
                }
            }
            float *o = out + ((size_t)i * heads + (size_t)h * group) * d;
            for (int g = 0; g < group; g++)
                for (int j = 0; j < d; j++) o[(size_t)g * d + j] = acc[(size_t)g * d + j] / l[g];
        }
        free(m);
    }
    return failed;
}
