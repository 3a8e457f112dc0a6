"""Decoder-only transformer (Gemma 3 text, Llama, Qwen2) over a static, slot-indexed KV cache.

Numerics follow the transformers implementations (RMSNorm in fp32, Gemma's (1 + weight) scale and
sqrt(hidden) embedding scale, rotary tables computed in fp32 then cast). Projections that read the same
input are fused (q/k/v, gate/up) to cut the number of matmuls per step, which dominates on CPU.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from . import int8_weights, kernels, sampling, vocab_screen
from .config import FULL, SLIDING, ModelConfig, RopeConfig
from .fused_decode import FusedDecode

log = logging.getLogger(__name__)

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


@dataclass
class Layer:
    sliding: bool
    input_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    qk_norm: torch.Tensor | None  # Gemma only: q_norm per query head, then k_norm per kv head [H + KV, D]
    post_attn_norm: torch.Tensor | None  # Gemma: after attention; Llama/Qwen: before the MLP
    pre_ff_norm: torch.Tensor | None  # Gemma only
    post_ff_norm: torch.Tensor | None  # Gemma only
    gate_up_w: torch.Tensor
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None


def inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Rotary inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / rope.factor, freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return freq


def rope_tables(rope: RopeConfig, head_dim: int, length: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.arange(length, dtype=torch.int64).float()[:, None] * inv_freq(rope, head_dim)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def norm_and_rope(qk: torch.Tensor, weight: torch.Tensor | None, eps: float, rope: tuple[torch.Tensor, torch.Tensor]):
    """The q and k heads `qk [B, T, heads, D]` after Gemma's per-head RMSNorm (`weight [heads, D]`; None: no
    norm), then rotated by `rope = (cos, sin)`, each `[B, T, D]` (every token's table at its position)."""
    if qk.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32) and kernels.enabled():
        return kernels.rms_norm(qk, weight, eps, rope=rope)
    if weight is not None:
        qk = rms_norm(qk, weight, eps, True)
    cos, sin = rope
    return apply_rope(qk, cos[:, :, None], sin[:, :, None])


# MKL's sgemm takes slow paths on AMD CPUs (28 GFLOP/s for 16 rows against the 262k-token vocabulary), so
# fp32 products go through oneDNN. The body's weights are reordered once into oneDNN's blocked layout
# (`prepack`), which spares each call reordering its weight. Decode step body, two interleaved runs at
# position 190: 4 rows 59.7 -> 48.4 and 57.5 -> 48.0 ms, 16 rows 85.7 -> 76.9 and 93.3 -> 89.0, one row
# 41.1 -> 35.5 and 39.0 -> 40.2; prefills no slower, and from 33 rows on the results are bit-identical.
# The output layer stays a plain tensor (the vocabulary screen reads its rows): for 2 to 32 rows, oneDNN
# computing the transposed product w @ x.T (the weight as its source, the rows as its small "weights"
# operand) is up to 1.7x faster than the usual orientation, which one row keeps. Without AVX-512
# oneDNN has no bf16 inner product: other dtypes keep F.linear.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PREPACK = _ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_PREPACK_ROWS = 16  # the batch size oneDNN picks the layout for; it served 1 to 512 rows as well in our timings
_FEW_ROWS = 32
# Output features per transposed call: each [chunk, rows] result is transposed while it is still in cache.
_CHUNK = 32768


def _copy_transposed(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src.t())` for `src [N, rows]`, through `[rows, N / B, B]` views: ATen copies those 1.5-3x
    faster than the plain 2-D transpose."""
    n, rows = src.shape
    b = math.gcd(n, 128)
    dst.view(rows, n // b, b).copy_(src.view(n // b, b, rows).permute(2, 0, 1))


def prepack(w: torch.Tensor) -> torch.Tensor:
    """`w` in oneDNN's blocked layout when `linear` can use it (fp32), else `w`: only `linear` may read it."""
    if _PREPACK and w.dtype == torch.float32:
        return torch.ops.mkldnn._reorder_linear_weight(w, _PREPACK_ROWS)
    return w


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """`F.linear(x, w, b)` for `x [..., K]` and `w` plain or from `prepack`; written to `out` (`[rows, N]`)
    when given."""
    rows = x.reshape(-1, x.shape[-1])
    if isinstance(w, int8_weights.Int8Linear):
        y = w(rows, out)
        if b is not None:
            y += b
    elif w.is_mkldnn:
        y = torch.ops.mkldnn._linear_pointwise(rows, w, b, "none", [], "")
    elif not (_ONEDNN and w.dtype == torch.float32):
        y = F.linear(rows, w, b)
    elif not 1 < rows.shape[0] <= _FEW_ROWS:
        y = torch.ops.mkldnn._linear_pointwise(rows, w, b, "none", [], "")
    else:
        y = torch.empty(rows.shape[0], w.shape[0], dtype=w.dtype) if out is None else out
        for start in range(0, w.shape[0], _CHUNK):
            part = torch.ops.mkldnn._linear_pointwise(w[start : start + _CHUNK], rows, None, "none", [], "")
            _copy_transposed(y[:, start : start + part.shape[0]], part)
        if b is not None:
            y += b
    if out is not None and y is not out:
        y = out.copy_(y)
    return y.view(*x.shape[:-1], y.shape[-1])


def _sliding_causal(queries: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """Which key positions each query position sees under a sliding window: itself and the window - 1 before
    it. `queries [rows, 1]` and `keys [1, length]` broadcast to the mask."""
    return (keys <= queries) & (keys > queries - window)


def sliding_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_query: int, first_key: int,
                      window: int, scale: float) -> torch.Tensor:
    """Prefill attention under a sliding window: `q [1, H, S, D]` at positions first_query.., over `k`, `v`
    `[1, KV, L, D]` at positions first_key... Queries go a block at a time, each over the keys its window
    reaches: one masked product over all S x L pairs (ATen's only way with a band mask) costs 4.8x as much at
    4,096 tokens and a 512 window."""
    block = min(128, window)
    outs = []
    for start in range(0, q.shape[2], block):
        end = min(q.shape[2], start + block)
        lo = max(0, first_query + start - window + 1 - first_key)  # the first key the block's first query sees
        hi = first_query + end - first_key
        queries = torch.arange(first_query + start, first_query + end)[:, None]
        keys = torch.arange(first_key + lo, first_key + hi)[None, :]
        outs.append(F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=_sliding_causal(queries, keys, window),
            scale=scale, enable_gqa=True,
        ))
    return torch.cat(outs, dim=2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """The RMSNorm of `x` times `weight` (`[dim]`, or `[heads, dim]` for per-head norms), plus `residual`."""
    if x.dtype == weight.dtype == torch.float32 and kernels.enabled():
        return kernels.rms_norm(x, weight, eps, residual)
    if residual is not None:
        return residual + rms_norm(x, weight, eps, gemma)
    if x.dtype == torch.float32 and weight.shape == x.shape[-1:]:
        # The same ops in one ATen call (bit-identical in fp32), saving per-op overhead on the hot path.
        return torch.rms_norm(x, x.shape[-1:], weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:  # weight already holds (1 + w) in fp32; scale before casting back, as HF Gemma does
        return (h * weight).type_as(x)
    return weight * h.to(x.dtype)


class Decoder:
    """Weights plus a KV cache of `[slots, kv_heads, max_seq_len, head_dim]` per layer, written in place."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype=torch.float32,
        screen_vocab: bool = True,
        int8: dict[str, tuple] | None = None,
    ):
        """`int8`: `int8_weights.load`'s block-quantized forms of fp32 `weights`, used in their place."""
        self.config = config
        self.dtype = dtype
        c = config
        self.act = _ACTIVATIONS.get(c.hidden_act)
        if self.act is None:
            raise ValueError(f"unsupported activation {c.hidden_act!r}")

        def w(name):
            return weights[name].to(dtype).contiguous()

        def opt(name):
            return w(name) if name in weights else None

        def norm(name):
            if c.is_gemma:
                return 1.0 + weights[name].float()
            return w(name)

        def qk_norm(prefix):
            q, k = norm(prefix + "q_norm.weight"), norm(prefix + "k_norm.weight")
            return torch.cat([q.expand(c.num_heads, -1), k.expand(c.num_kv_heads, -1)])

        def cat(names):
            parts = [opt(n) for n in names]
            return None if any(p is None for p in parts) else torch.cat(parts).contiguous()

        def int8_form(names):  # the weights of `names`, stacked, as the checkpoint's int8 form if it has one
            if int8 and dtype == torch.float32 and all(n in int8 for n in names):
                parts = [int8[n] for n in names]
                if not all(int8_weights.matches(part, weights[n]) for part, n in zip(parts, names)):
                    log.warning("int8 weights of %s differ from the checkpoint's: fp32 used", names)
                    return None
                try:
                    return int8_weights.Int8Linear.concat(parts)
                except ValueError as e:
                    log.info("int8 weights of %s do not fit the kernel (%s): fp32 used", names, e)
            return None

        def body(names):  # a projection's weight (fused when several names): int8, else fp32 prepacked
            return int8_form(names) or prepack(torch.cat([w(n) for n in names]))

        self.embed = w("model.embed_tokens.weight")
        tied = c.tie_word_embeddings or "lm_head.weight" not in weights
        self.lm_head = self.embed if tied else w("lm_head.weight")
        # Full logits (sampled rows) from the int8 form where there is one: 1 / 4 / 16 rows of the default
        # model's 262k-token layer 28.6 / 53.3 / 68.2 ms in fp32, 11.8 / 18.9 / 51.5 ms so.
        self.lm_head_int8 = int8_form(["model.embed_tokens.weight" if tied else "lm_head.weight"])
        # HF multiplies by sqrt(hidden) cast to the embedding dtype (bf16 rounds it)
        self.embed_scale = torch.tensor(c.hidden_size**0.5).to(dtype) if c.is_gemma else None
        self.final_norm = norm("model.norm.weight")
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            self.layers.append(
                Layer(
                    sliding=c.layer_types[i] == SLIDING and c.sliding_window is not None,
                    input_norm=norm(p + "input_layernorm.weight"),
                    qkv_w=body([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]),
                    qkv_b=cat([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]),
                    o_w=body([a + "o_proj.weight"]),
                    o_b=opt(a + "o_proj.bias"),
                    qk_norm=qk_norm(a) if c.is_gemma else None,
                    post_attn_norm=norm(p + "post_attention_layernorm.weight"),
                    pre_ff_norm=norm(p + "pre_feedforward_layernorm.weight") if c.is_gemma else None,
                    post_ff_norm=norm(p + "post_feedforward_layernorm.weight") if c.is_gemma else None,
                    gate_up_w=body([m + "gate_proj.weight", m + "up_proj.weight"]),
                    gate_up_b=cat([m + "gate_proj.bias", m + "up_proj.bias"]),
                    down_w=body([m + "down_proj.weight"]),
                    down_b=opt(m + "down_proj.bias"),
                )
            )
        # Greedy rows skip most of the fp32 output layer (see vocab_screen). Softcapped logits keep the plain
        # argmax: capping can turn distinct logits into fp32 ties, which the screen would not see.
        self.screen = None
        if screen_vocab and dtype == torch.float32 and c.final_logit_softcapping is None and vocab_screen.available():
            self.screen = vocab_screen.VocabScreen(self.lm_head, self.final_norm)
        self.slots = 0
        self.max_seq_len = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.logits_out = torch.empty(0)
        self.fused: FusedDecode | None = None  # set by allocate_cache where it applies

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path, dtype=torch.float32, screen_vocab: bool = True) -> "Decoder":
        checkpoint_dir = Path(checkpoint_dir)
        files = sorted(checkpoint_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {checkpoint_dir}")
        weights = {}
        for f in files:
            weights.update(load_file(f))
        config = ModelConfig.from_dir(checkpoint_dir)
        return cls(config, weights, dtype, screen_vocab, int8_weights.load(checkpoint_dir))

    def allocate_cache(self, slots: int, max_seq_len: int) -> None:
        c = self.config
        shape = (slots, c.num_kv_heads, max_seq_len, c.head_dim)
        # Resident from the start (torch writes the zeros): the cache is the engine's bounded memory, slots x
        # max_seq_len tokens (36 KB per token for Gemma 3 270M in fp32). Zeros, not garbage: attention weighs
        # unwritten positions by 0, and 0 x NaN would still be NaN.
        self.k_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.slots, self.max_seq_len = slots, max_seq_len
        # Reused by every step: a fresh [rows, vocab] result would page-fault its megabytes in each time.
        self.logits_out = torch.empty(slots, c.vocab_size)
        self.rope = {t: rope_tables(c.rope[t], c.head_dim, max_seq_len, self.dtype) for t in (FULL, SLIDING)}
        self.fused = FusedDecode.build(self, slots)

    # ---- public forward passes -------------------------------------------------------------------

    def prefill(self, slots: list[int], prompts: list[torch.Tensor], starts: list[int] | None = None) -> torch.Tensor:
        """Run prompts (`[T_i]` token ids) into cache slots `slots`, packed into one sequence; return the final
        hidden states `[len(prompts), hidden]` of each prompt's last position (for `logits` or `greedy`).
        Prompt i goes to positions `starts[i]` onwards (default 0) and attends to what its slot holds before
        them: a prefix whose keys and values are already cached."""
        c = self.config
        starts = starts or [0] * len(prompts)
        lengths = torch.tensor([p.shape[0] for p in prompts])
        ends = lengths.cumsum(0)
        seg = torch.repeat_interleave(torch.arange(len(prompts)), lengths)  # prompt of each token
        pos = torch.arange(int(ends[-1])) - (ends - lengths)[seg] + torch.tensor(starts)[seg]
        spans = [(int(end - n), int(end)) for n, end in zip(lengths, ends)]
        # Each prompt attends to its own slot alone: one causal product per prompt, rather than one over the packed
        # sequence with a block-diagonal mask, which computed every prompt against every other (a 4 x 128-token
        # prefill: 1100 -> 996 ms).
        slot_of = torch.tensor(slots)[seg]
        flat_rows = self._cache_rows(slot_of, pos)

        def attend(layer, li, q, k, v):
            # q [1,S,H,D], k/v [1,S,KV,D]: write the cache, then each prompt attends over its slot
            self.k_cache[li].view(-1, c.head_dim).index_copy_(0, flat_rows, k.reshape(-1, c.head_dim))
            self.v_cache[li].view(-1, c.head_dim).index_copy_(0, flat_rows, v.reshape(-1, c.head_dim))
            q = q.transpose(1, 2)
            outs = [self._prefill_attention(li, layer, q[:, :, span_start:span_end], slot, start)
                    for slot, start, (span_start, span_end) in zip(slots, starts, spans)]
            return torch.cat(outs, dim=2).transpose(1, 2)

        h = self._run(torch.cat(prompts)[None, :], pos[None, :], attend)
        return self._final_norm(h[0, ends - 1])

    def _prefill_attention(self, li: int, layer: Layer, q: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """Prefill attention of `q [1, H, S, D]` at positions start..start+S-1 of `slot`, over the slot's keys
        up to there: the prompt's own, just written, after any cached prefix."""
        c = self.config
        length = start + q.shape[2]
        k, v = self.k_cache[li][slot : slot + 1, :, :length], self.v_cache[li][slot : slot + 1, :, :length]
        window = c.sliding_window if layer.sliding else 0
        if window and length > window:  # a band only where the keys outgrow the window
            return sliding_attention(q, k, v, start, 0, window, c.attn_scale)
        if not start:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.attn_scale, enable_gqa=True)
        causal = torch.arange(length)[None, :] <= torch.arange(start, length)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=c.attn_scale, enable_gqa=True)

    def copy_cache_prefix(self, source: int, target: int, length: int) -> None:
        """Copy positions 0..length-1 of cache slot `source` to slot `target`, in every layer."""
        for cache in (*self.k_cache, *self.v_cache):
            cache[target, :, :length].copy_(cache[source, :, :length])

    def native_decode_attention(self) -> bool:
        """Whether decode steps attend with kernels.decode_attention (the per-op path and the fused step alike)."""
        c = self.config
        return (self.dtype == torch.float32 and c.num_heads // c.num_kv_heads <= kernels.MAX_ATTENTION_GROUP
                and kernels.enabled())

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for cache slots `0..n-1`: `tokens[i]` goes to position `positions[i]` of slot i. Returns the
        final hidden states `[n, hidden]` (for `logits` or `greedy`). Slots whose results are discarded still
        write their cache row: give them a position at or below the batch maximum."""
        if self.fused is not None:
            return self._final_norm(self.fused(self._embed(tokens), positions))
        n = tokens.shape[0]
        c = self.config
        flat_rows = self._cache_rows(torch.arange(n), positions)
        native = self.native_decode_attention()
        if not native:
            length = int(positions.max()) + 1
            keys = torch.arange(length)[None, :]
            causal = keys <= positions[:, None]
            masks = {False: (0, causal[:, None, None, :])}
            if c.sliding_window:
                # Keys older than every row's window are skipped entirely.
                lo = max(0, int(positions.min()) - c.sliding_window + 1)
                band = _sliding_causal(positions[:, None], keys, c.sliding_window)
                masks[True] = (lo, band[:, None, None, lo:])
        groups = c.num_heads // c.num_kv_heads

        def attend(layer, li, q, k, v):
            # q [n,1,H,D], k/v [n,1,KV,D]
            self.k_cache[li].view(-1, c.head_dim).index_copy_(0, flat_rows, k.reshape(-1, c.head_dim))
            self.v_cache[li].view(-1, c.head_dim).index_copy_(0, flat_rows, v.reshape(-1, c.head_dim))
            if native:  # each row reads its own keys once for all heads of a group, with no mask
                window = c.sliding_window if layer.sliding else 0
                out = kernels.decode_attention(q[:, 0], self.k_cache[li], self.v_cache[li], positions, window,
                                               c.attn_scale)
                return out.view(n, 1, c.num_heads, c.head_dim)
            lo, mask = masks[layer.sliding]
            # One query per row: fold each GQA group's heads into the query axis, so keys are not repeated.
            out = F.scaled_dot_product_attention(
                q.reshape(n, c.num_kv_heads, groups, c.head_dim),
                self.k_cache[li][:n, :, lo:length],
                self.v_cache[li][:n, :, lo:length],
                attn_mask=mask,
                scale=c.attn_scale,
            )
            return out.view(n, 1, c.num_heads, c.head_dim)

        h = self._run(tokens[:, None], positions[:, None], attend)
        return self._final_norm(h[:, 0])

    # ---- shared body -----------------------------------------------------------------------------

    def _gated_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`act(gate) * up` of the fused gate/up projection's output."""
        if gate_up.dtype == torch.float32 and self.config.hidden_act in kernels.GATED_ACTIVATIONS and kernels.enabled():
            return kernels.gated_activation(gate_up, self.config.hidden_act)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def _cache_rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows, in a layer's cache viewed as `[-1, head_dim]`, of each token's (slot, kv head, position), in
        the order of k.reshape(-1, head_dim). index_copy_ on that view is orders of magnitude faster than
        advanced-index assignment on the 4-D tensor."""
        heads = torch.arange(self.config.num_kv_heads)
        return ((slots[:, None] * len(heads) + heads) * self.max_seq_len + positions[:, None]).reshape(-1)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.embed)
        return x if self.embed_scale is None else x * self.embed_scale

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        c = self.config
        gemma = c.is_gemma
        eps = c.rms_norm_eps
        B, T = tokens.shape
        x = self._embed(tokens)
        ropes = {t: (cos[positions], sin[positions]) for t, (cos, sin) in self.rope.items()}  # [B, T, D] each
        H, KV, D = c.num_heads, c.num_kv_heads, c.head_dim
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, eps, gemma)
            qkv = linear(h, layer.qkv_w, layer.qkv_b)
            # q and k heads are adjacent: norm and rotate them in one go
            qk = qkv[..., : (H + KV) * D].view(B, T, H + KV, D)
            v = qkv[..., (H + KV) * D :].view(B, T, KV, D)
            qk = norm_and_rope(qk, layer.qk_norm if gemma else None, eps, ropes[SLIDING if layer.sliding else FULL])
            q, k = qk[:, :, :H], qk[:, :, H:]
            attn = attend(layer, li, q, k, v).reshape(B, T, H * D)
            attn = linear(attn, layer.o_w, layer.o_b)
            if gemma:
                x = rms_norm(attn, layer.post_attn_norm, eps, True, residual=x)
                h = rms_norm(x, layer.pre_ff_norm, eps, True)
            else:
                x = x + attn
                h = rms_norm(x, layer.post_attn_norm, eps, False)
            h = linear(self._gated_act(linear(h, layer.gate_up_w, layer.gate_up_b)), layer.down_w, layer.down_b)
            x = rms_norm(h, layer.post_ff_norm, eps, True, residual=x) if gemma else x + h
        return x

    def _final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.final_norm, self.config.rms_norm_eps, self.config.is_gemma)

    # ---- output layer ----------------------------------------------------------------------------

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits `[rows, vocab]` of final hidden states `[rows, hidden]`, valid until the next call."""
        logits = linear(hidden, self.lm_head_int8 or self.lm_head, out=self.logits_out[: hidden.shape[0]])
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        return logits

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """`logits(hidden).argmax(-1)`: the greedy token of each row."""
        tokens = self.screen.argmax(hidden) if self.screen is not None else None
        return tokens if tokens is not None else sampling.argmax(self.logits(hidden))
