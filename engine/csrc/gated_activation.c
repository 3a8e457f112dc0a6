// The gated MLP's activation: out[r][j] = act(x[r][j]) * x[r][d + j] for x = [gate | up] (the fused gate/up
// projection's output, [rows][2d]) and out [rows][d]; act 0 is GELU's tanh form, 1 is SiLU. One pass instead
// of ATen's activation then product (GELU-tanh alone ~3 ns an element in ATen here).
//
// Both are x * sigmoid(z): GELU-tanh 0.5 x (1 + tanh(y)) = x * sigmoid(2y) with y = sqrt(2 / pi) (x + 0.044715
// x^3), SiLU with z = x. exp is Cephes' single-precision polynomial (about 1 ulp), vectorized.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln 2, ln 2 in two parts
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float sigmoid_arg(float x, int act) {
    return act == 0 ? 1.5957691216057308f * (x + 0.044715f * x * x * x) : x;  // 2 sqrt(2 / pi)
}

void gated_activation(const float *x, int rows, int d, int act, float *out) {
#pragma omp parallel for schedule(static) if ((int64_t)rows * d >= 1 << 16)
    for (int r = 0; r < rows; r++) {
        const float *gate = x + (size_t)r * 2 * d, *up = gate + d;
        float *o = out + (size_t)r * d;
        int j = 0;
        for (; j + 8 <= d; j += 8) {
            const __m256 g = _mm256_loadu_ps(gate + j);
            __m256 z = g;
            if (act == 0) {
                const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
                z = _mm256_mul_ps(_mm256_set1_ps(1.5957691216057308f),
                                  _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), cube, g));
            }
            const __m256 denominator =
                _mm256_add_ps(_mm256_set1_ps(1.f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), z)));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(g, denominator), _mm256_loadu_ps(up + j)));
        }
        for (; j < d; j++) o[j] = gate[j] / (1.f + expf(-sigmoid_arg(gate[j], act))) * up[j];
    }
}
