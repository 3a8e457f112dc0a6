// RMSNorm in fp32, optionally added to a residual: out = residual + x / sqrt(mean(x^2) + eps) * w, for each
// vector of `dim` values. ATen's rms_norm costs ~50 us a call at 16 rows, most of it dispatch through its
// composite ops, and a decode step makes 73 of them on Gemma 3; this is one pass of ~2 us.
//
// x holds `rows` rows `row_stride` floats apart, each of `heads` contiguous vectors (Gemma's per-head q/k
// norm; 1 otherwise); w is [dim], or [heads][dim] when `w_per_head`; out and residual (NULL: none) are
// contiguous [rows][heads][dim] and may be the same memory.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vector_math.h"

static void norm_one(const float *x, const float *w, int dim, float eps, const float *residual, float *out) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int i = 0;
    for (; i + 16 <= dim; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(b, b, s1);
    }
    float sum = hsum(_mm256_add_ps(s0, s1));
    for (; i < dim; i++) sum += x[i] * x[i];
    const float r = 1.f / sqrtf(sum / dim + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= dim; i += 8) {
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i));
        if (residual) y = _mm256_add_ps(_mm256_loadu_ps(residual + i), y);
        _mm256_storeu_ps(out + i, y);
    }
    for (; i < dim; i++) out[i] = (residual ? residual[i] : 0.f) + x[i] * r * w[i];
}

void rms_norm(const float *x, int64_t row_stride, int rows, int heads, int dim, const float *w, int w_per_head,
              float eps, const float *residual, float *out) {
    // Threads only pay off on prefill-sized inputs: a parallel region costs a few microseconds.
#pragma omp parallel for schedule(static) if ((int64_t)rows * heads * dim >= 1 << 16)
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < heads; h++) {
            const size_t at = ((size_t)r * heads + h) * dim;
            norm_one(x + r * row_stride + (size_t)h * dim, w_per_head ? w + (size_t)h * dim : w, dim, eps,
                     residual ? residual + at : NULL, out + at);
        }
}
