// The vocabulary screen's block maxima (engine/vocab_screen.py), in one read of its int8 scores: per row and
// block of `block` tokens, the largest score, and the largest upper bound
//     bound[r][j] = score[r][j] + l1[r] * half_step[j] + err[r] * norm[j].
// ATen needs four passes over the [rows, vocab] scores for these (two in-place additions, two maxima).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vector_math.h"

// scores [rows][n]; `block` a multiple of 8 dividing n; out [rows][n / block] each.
void screen_blocks(const float *scores, int rows, int n, int block, const float *l1, const float *err,
                   const float *half_step, const float *norm, float *block_score, float *block_bound) {
    const int blocks = n / block;
#pragma omp parallel for schedule(static) if (rows > 1)  // one row: OpenMP's team sleeps (engine.py)
    for (int task = 0; task < rows * blocks; task++) {
        const int r = task / blocks, b = task % blocks;
        const float *s = scores + (size_t)r * n + (size_t)b * block;
        const float *h = half_step + (size_t)b * block, *q = norm + (size_t)b * block;
        const __m256 l = _mm256_set1_ps(l1[r]), e = _mm256_set1_ps(err[r]);
        __m256 top = _mm256_set1_ps(-INFINITY), bound = top;
        for (int j = 0; j < block; j += 8) {
            const __m256 v = _mm256_loadu_ps(s + j);
            top = _mm256_max_ps(top, v);
            bound = _mm256_max_ps(bound, _mm256_fmadd_ps(l, _mm256_loadu_ps(h + j),
                                                         _mm256_fmadd_ps(e, _mm256_loadu_ps(q + j), v)));
        }
        block_score[task] = hmax(top);
        block_bound[task] = hmax(bound);
    }
}
