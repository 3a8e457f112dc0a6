// RMSNorm in fp32, optionally added to a residual: out = residual + x / sqrt(mean(x^2) + eps) * w, for each
// vector of `dim` values. ATen's rms_norm costs ~50 us a call at 16 rows, most of it dispatch through its
// composite ops, and a decode step makes 73 of them on Gemma 3; this is one pass of ~2 us.
//
// x holds `rows` rows `row_stride` floats apart, each of `heads` contiguous vectors (Gemma's per-head q/k
// norm; 1 otherwise); w is [dim], or [heads][dim] when `w_per_head`, or NULL for no norm at all; out and
// residual (NULL: none) are contiguous [rows][heads][dim] and may be the same memory. With `cos` and `sin`
// ([rows][dim], each row's rotary table at its position), each vector is then rotated (RoPE, rotate-half
// form): q and k get their norm and rotation in one pass.
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

// y = y * cos + rotate_half(y) * sin, rotate_half(y) = [-y2, y1] for the halves y1, y2 of y.
static void rotate(float *y, const float *c, const float *s, int dim) {
    const int half = dim / 2;
    int i = 0;
    for (; i + 8 <= half; i += 8) {
        const __m256 a = _mm256_loadu_ps(y + i), b = _mm256_loadu_ps(y + half + i);
        _mm256_storeu_ps(y + i, _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)),
                                              _mm256_mul_ps(b, _mm256_loadu_ps(s + i))));
        _mm256_storeu_ps(y + half + i, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + half + i)),
                                                     _mm256_mul_ps(a, _mm256_loadu_ps(s + half + i))));
    }
    for (; i < half; i++) {
        const float a = y[i], b = y[half + i];
        y[i] = a * c[i] - b * s[i];
        y[half + i] = b * c[half + i] + a * s[half + i];
    }
}

void rms_norm(const float *x, int64_t row_stride, int rows, int heads, int dim, const float *w, int w_per_head,
              float eps, const float *residual, float *out, const float *cos, const float *sin) {
    // Threads only pay off on prefill-sized inputs: a parallel region costs a few microseconds.
#pragma omp parallel for schedule(static) if ((int64_t)rows * heads * dim >= 1 << 16)
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < heads; h++) {
            const size_t at = ((size_t)r * heads + h) * dim;
            const float *v = x + r * row_stride + (size_t)h * dim;
            if (w)
                norm_one(v, w_per_head ? w + (size_t)h * dim : w, dim, eps, residual ? residual + at : NULL, out + at);
            else
                for (int i = 0; i < dim; i++) out[at + i] = (residual ? residual[at + i] : 0.f) + v[i];
            if (cos) rotate(out + at, cos + (size_t)r * dim, sin + (size_t)r * dim, dim);
        }
}
