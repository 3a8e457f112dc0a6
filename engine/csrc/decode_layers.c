// A decode step's pass through every layer in one call. Per layer the step makes ~14 calls (norms, four
// projections, rotary, cache writes, attention, activation); from Python each costs 15-30 us of dispatch,
// ctypes and tensor allocation, as much as the one-row step's kernels themselves. This file runs the same
// kernels in the same order as the per-op path (engine/model.py `Decoder._run`), so the result is the same
// to the bit; it is linked with their sources (engine/fused_decode.py).
#include <stdint.h>
#include <string.h>

void rms_norm(const float *x, int64_t row_stride, int rows, int heads, int dim, const float *w, int w_per_head,
              float eps, const float *residual, float *out, const float *cos, const float *sin);
int int8_linear(const float *x, int m, int k_in, int n_out, int group, const int8_t *q, const float *a,
                const float *b, float *y);
int decode_attention(const float *q, int64_t q_stride, int n, int heads, int kv_heads, int d, const float *k_cache,
                     const float *v_cache, int max_seq_len, const int64_t *positions, int window, float softmax_scale,
                     float *out);
void gated_activation(const float *x, int rows, int d, int act, float *out);

// An int8 projection (engine/int8_weights.py's packed form) and its bias (NULL: none).
typedef struct {
    const int8_t *q;
    const float *scale, *offset, *bias;
    int n_out, k_in, group;
} Projection;

// One layer's weights and KV cache ([slots][kv_heads][max_seq_len][head_dim] each). Gemma has all five norms
// and a per-head q/k norm ([heads + kv_heads][head_dim]); Llama and Qwen have input and post-attention norms
// only (post_attn_norm then comes before the MLP) and qk_norm NULL.
typedef struct {
    const float *input_norm, *qk_norm, *post_attn_norm, *pre_ff_norm, *post_ff_norm;
    Projection qkv, o, gate_up, down;
    float *k_cache, *v_cache;
    int sliding;
} Layer;

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, intermediate, max_seq_len, sliding_window, gemma, act;
    float eps, attn_scale;
} Shape;

static int project(const Projection *p, const float *x, int n, float *y) {
    const int status = int8_linear(x, n, p->k_in, p->n_out, p->group, p->q, p->scale, p->offset, y);
    if (!status && p->bias)
        for (int r = 0; r < n; r++)
            for (int j = 0; j < p->n_out; j++) y[(size_t)r * p->n_out + j] += p->bias[j];
    return status;
}

static void add(float *x, const float *y, size_t count) {
    for (size_t i = 0; i < count; i++) x[i] += y[i];
}

// The rotary table rows of each token's position: [n][head_dim] from a [max_seq_len][head_dim] table.
static void gather_rows(const float *table, const int64_t *positions, int n, int d, float *out) {
    for (int i = 0; i < n; i++) memcpy(out + (size_t)i * d, table + positions[i] * d, sizeof(float) * d);
}

// x [n][hidden] (the embedded tokens) becomes the last layer's output; row i goes to cache slot i at
// positions[i]. `rope` holds the full and the sliding layers' cos and sin tables, in that order. `work` holds
// the floats per row that engine/fused_decode.py allocates. Returns 0, 1 for a position outside the
// cache, or the first failing kernel's status.
int decode_layers(const Shape *s, const Layer *layers, int n, const int64_t *positions, const float *const rope[4],
                  float *x, float *work) {
    for (int i = 0; i < n; i++)  // checked before the first cache write
        if (positions[i] < 0 || positions[i] >= s->max_seq_len) return 1;
    const int H = s->heads, KV = s->kv_heads, D = s->head_dim;
    const int qkv_width = (H + 2 * KV) * D, qk_width = (H + KV) * D;
    float *h = work, *qkv = h + (size_t)n * s->hidden, *qk = qkv + (size_t)n * qkv_width;
    float *attn = qk + (size_t)n * qk_width, *proj = attn + (size_t)n * H * D;
    float *gate_up = proj + (size_t)n * s->hidden, *act = gate_up + (size_t)n * 2 * s->intermediate;
    float *tables = act + (size_t)n * s->intermediate;  // cos, sin of full layers, then of sliding ones
    for (int t = 0; t < 4; t++) gather_rows(rope[t], positions, n, D, tables + (size_t)t * n * D);
    int status = 0;
    for (int li = 0; li < s->layers && !status; li++) {
        const Layer *L = &layers[li];
        const float *cos = tables + (size_t)(L->sliding ? 2 : 0) * n * D, *sin = cos + (size_t)n * D;
        rms_norm(x, s->hidden, n, 1, s->hidden, L->input_norm, 0, s->eps, NULL, h, NULL, NULL);
        if ((status = project(&L->qkv, h, n, qkv))) break;
        // q and k heads are adjacent: normed (Gemma) and rotated in one go, v stays in qkv
        rms_norm(qkv, qkv_width, n, H + KV, D, L->qk_norm, 1, s->eps, NULL, qk, cos, sin);
        for (int i = 0; i < n; i++)
            for (int g = 0; g < KV; g++) {
                const size_t row = (((size_t)i * KV + g) * s->max_seq_len + positions[i]) * D;
                memcpy(L->k_cache + row, qk + (size_t)i * qk_width + (size_t)(H + g) * D, sizeof(float) * D);
                memcpy(L->v_cache + row, qkv + (size_t)i * qkv_width + (size_t)(H + KV + g) * D, sizeof(float) * D);
            }
        if ((status = decode_attention(qk, qk_width, n, H, KV, D, L->k_cache, L->v_cache, s->max_seq_len, positions,
                                       L->sliding ? s->sliding_window : 0, s->attn_scale, attn)))
            break;
        if ((status = project(&L->o, attn, n, proj))) break;
        if (s->gemma) {
            rms_norm(proj, s->hidden, n, 1, s->hidden, L->post_attn_norm, 0, s->eps, x, x, NULL, NULL);
            rms_norm(x, s->hidden, n, 1, s->hidden, L->pre_ff_norm, 0, s->eps, NULL, h, NULL, NULL);
        } else {
            add(x, proj, (size_t)n * s->hidden);
            rms_norm(x, s->hidden, n, 1, s->hidden, L->post_attn_norm, 0, s->eps, NULL, h, NULL, NULL);
        }
        if ((status = project(&L->gate_up, h, n, gate_up))) break;
        gated_activation(gate_up, n, s->intermediate, s->act, act);
        if ((status = project(&L->down, act, n, proj))) break;
        if (s->gemma)
            rms_norm(proj, s->hidden, n, 1, s->hidden, L->post_ff_norm, 0, s->eps, x, x, NULL, NULL);
        else
            add(x, proj, (size_t)n * s->hidden);
    }
    return status;
}
