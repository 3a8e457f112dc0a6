"""Exact greedy tokens from an int8 screen of the vocabulary projection.

On the default model the fp32 output layer (262k x 640) is about 45% of a decode step. Greedy decoding
needs only its argmax, so each row is first scored against an int8 copy of the layer (csrc/int8_screen.c,
or fbgemm's equal product; ~3x faster), every score gets a rigorous bound on its quantization error, and
only the tokens whose upper bound reaches an exact fp32 logit are rescored in fp32. The argmax of those is
the argmax of the full fp32 logits: a token left out has an upper bound below a logit that some candidate
beats or equals.

Bound, with `x` the row and `w_j` a vocabulary row, both after the per-channel migration below, and
`~` the quantized values:
    |w_j.x - ~w_j.~x| <= |x|_1 * s_j / 2  +  |x - ~x|_2 * |~w_j|_2
where `s_j` is row j's weight step (rounding error <= s_j / 2 per weight). On the default model about 200
of 262,144 tokens per row need rescoring (median; a few thousand at worst).

The hidden state is the final RMSNorm's output, whose scale `gamma` gives a few channels 10-300x the
others. Scaling the weights' channels by `gamma ** 0.25` and the row's by its inverse (SmoothQuant's
migration) balances the two rounding errors; with no migration the bound admits ~20,000x more tokens.
"""

import ctypes
import functools
import warnings

import torch

from . import kernels, native, sampling

# fbgemm's u8 x s8 kernel adds pairs of products in int16: 7-bit activations keep 8-bit weights from
# saturating it. Rows are scaled to max |x| = 1, so one fixed step and zero point serve every row and no
# row's quantization depends on its batch neighbours.
# (6-bit activations would let csrc/int8_screen.c add two pairs in int16 before widening: its product 16-20%
# faster at 16-32 rows. But the looser bound admits ~10x the candidates: after "The capital of France is",
# per row median 30 -> 341, 90th percentile 128 -> 2,807, at most 765 -> 11,787; a one-row step got slower.)
_ZERO_POINT = 63
_STEP = 1 / _ZERO_POINT
_MIGRATION = 0.25
# Headroom for fp32 rounding in the scores, the bound and the fp32 rescoring (all below 1e-3 relative).
_SLACK = 1.05
_ABS_SLACK = 1e-4
# Above this many candidates in a step (never seen on real models) the full fp32 product is cheaper.
_MAX_CANDIDATES = 1 << 16
_BUILD_ROWS = 16384


_ENGINES = ("x86", "fbgemm")  # torch's quantized engines that run fbgemm's kernels on x86, preferred first


def _fbgemm_available() -> bool:
    return hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32") and any(
        engine in torch.backends.quantized.supported_engines for engine in _ENGINES
    )


@functools.cache
def _kernel():
    """csrc/int8_screen.c: fbgemm's product, bit for bit, on the default model 31.0 -> 26.2 ms at 16 rows, 9.4 ->
    7.3 ms at one (interleaved); where it cannot be built (or ENGINE_NATIVE_KERNELS=0), fbgemm's."""
    i32, ptr = ctypes.c_int, ctypes.c_void_p
    return native.function("int8_screen", i32, [ptr, i32, i32, i32, ptr, ptr, ptr, i32, ptr])


@functools.cache
def _block_kernel():
    i32, ptr = ctypes.c_int, ctypes.c_void_p
    return native.function("screen_blocks", None, [ptr, i32, i32, i32] + [ptr] * 6)


def _native() -> bool:
    """Whether our int8 product and block pass run here; else fbgemm's product and ATen's passes."""
    return kernels.enabled() and None not in (_kernel(), _block_kernel())


def available() -> bool:
    return _native() or _fbgemm_available()


class VocabScreen:
    """`argmax(h @ weight.T)` per row of `h`, through the int8 screen; `weight` `[vocab, hidden]` fp32."""

    def __init__(self, weight: torch.Tensor, channel_scale: torch.Tensor | None = None):
        if weight.dtype != torch.float32:
            raise ValueError("the screen rescores in fp32: weight must be fp32")
        self.weight = weight
        vocab, hidden = weight.shape
        migration = torch.ones(hidden) if channel_scale is None else channel_scale.float().abs() ** _MIGRATION
        migration = migration.clamp(min=1e-3 * float(migration.max()))
        self.inverse_migration = 1 / migration
        quantized = torch.empty(vocab, hidden, dtype=torch.int8)
        step, quantized_norm = torch.empty(vocab), torch.empty(vocab)
        for start in range(0, vocab, _BUILD_ROWS):  # in slices: no full-size fp32 temporaries
            migrated = weight[start : start + _BUILD_ROWS] * migration
            rows_step = (migrated.abs().amax(1) / 127).clamp_(min=torch.finfo(torch.float32).tiny)
            rows = migrated.div_(rows_step[:, None]).round_().clamp_(-127, 127)
            quantized[start : start + _BUILD_ROWS] = rows
            step[start : start + _BUILD_ROWS] = rows_step
            quantized_norm[start : start + _BUILD_ROWS] = torch.linalg.vector_norm(rows, dim=1) * rows_step
        self.half_step = step / 2
        self.quantized_norm = quantized_norm  # |~w_j|_2
        self.native = _native() and vocab % 16 == 0 and hidden % 4 == 0
        if self.native:  # csrc/int8_screen.c's layout: [vocab / 16][hidden / 4][16][4]
            self.row_sum = quantized.sum(1, dtype=torch.int32)
            self.score_scale = step * _STEP
            self.packed = quantized.view(vocab // 16, 16, hidden // 4, 4).transpose(1, 2).contiguous()
            self.scores_out = torch.empty(0)  # reused: a fresh [rows, vocab] result page-faults in each step
        else:
            with warnings.catch_warnings():  # quantized tensors are deprecated, fbgemm's kernels are not yet
                warnings.simplefilter("ignore")
                supported = torch.backends.quantized.supported_engines
                torch.backends.quantized.engine = next(engine for engine in _ENGINES if engine in supported)
                per_row = torch._make_per_channel_quantized_tensor(
                    quantized, step.double(), torch.zeros(vocab, dtype=torch.long), 0
                )
                self.packed = torch.ops.quantized.linear_prepack(per_row, None)
        self.block = sampling.block_size(vocab) or vocab

    def argmax(self, h: torch.Tensor) -> torch.Tensor | None:
        """Greedy token of each row of `h` `[rows, hidden]` (fp32), the first index of its largest logit;
        None when the full product is the cheaper way (too many candidates) or the row is not finite."""
        rows = h.shape[0]
        x, peak, levels = self._quantize(h)
        l1 = torch.linalg.vector_norm(x, 1, dim=1) * _SLACK
        error = torch.linalg.vector_norm(x - levels * _STEP, dim=1) * _SLACK
        scores = self._scores(x, levels)
        block_score, block_bound = self._block_maxima(scores, l1, error)
        # The exact logit of each row's best-scored token is a lower bound on the row's maximum.
        anchor = sampling.argmax(scores, block_score)
        floor = self._exact_logits(anchor, h) / peak - _ABS_SLACK
        # Tokens whose bound reaches the floor, found block by block: few blocks hold any, and only theirs are
        # computed here. (index_select: advanced indexing gathers rows several times slower.)
        blocks = scores.view(-1, self.block)  # [rows * blocks per row, block]
        blocks_per_row = scores.shape[1] // self.block
        hits = (block_bound >= floor[:, None]).view(-1).nonzero()[:, 0]
        hit_rows, hit_blocks = hits // blocks_per_row, hits % blocks_per_row
        bounds = blocks.index_select(0, hits)
        bounds += l1[hit_rows, None] * self.half_step.view(-1, self.block).index_select(0, hit_blocks)
        bounds += error[hit_rows, None] * self.quantized_norm.view(-1, self.block).index_select(0, hit_blocks)
        in_hit, offset = (bounds >= floor[hit_rows, None]).nonzero(as_tuple=True)
        cand_rows = hit_rows[in_hit]
        cand_tokens = hit_blocks[in_hit] * self.block + offset
        if cand_tokens.numel() > _MAX_CANDIDATES:
            return None
        logits = self._exact_logits(cand_tokens, h.index_select(0, cand_rows))
        best = torch.full((rows,), float("-inf")).scatter_reduce_(0, cand_rows, logits, "amax")
        winners = logits == best[cand_rows]
        vocab = self.weight.shape[0]
        tokens = torch.full((rows,), vocab).scatter_reduce_(0, cand_rows[winners], cand_tokens[winners], "amin")
        return None if bool((tokens == vocab).any()) else tokens

    def _quantize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows `h` migrated and scaled to max |x| = 1 (scores and bounds are then in units of the row's logits /
        its `peak`), with their quantized `levels` (x ~ levels * _STEP)."""
        x = h * self.inverse_migration
        peak = x.abs().amax(1).clamp_(min=torch.finfo(torch.float32).tiny)
        x /= peak[:, None]
        return x, peak, torch.round(x / _STEP).clamp_(-_ZERO_POINT, 127 - _ZERO_POINT)

    def _block_maxima(self, scores: torch.Tensor, l1: torch.Tensor, error: torch.Tensor):
        """Per row and block, the largest score and the largest upper bound `score + l1 * s_j / 2 + error *
        |~w_j|_2` (csrc/screen_blocks.c: one read of the scores), each `[rows, blocks]`."""
        rows, vocab = scores.shape
        if not self.native:
            by_block = scores.view(rows, -1, self.block)
            bounds = scores.addr(l1, self.half_step).addr_(error, self.quantized_norm)
            return by_block.amax(-1), bounds.view(rows, -1, self.block).amax(-1)
        block_score, block_bound = torch.empty(2, rows, vocab // self.block)
        l1, error = l1.contiguous(), error.contiguous()
        _block_kernel()(scores.data_ptr(), rows, vocab, self.block, l1.data_ptr(), error.data_ptr(),
                        self.half_step.data_ptr(), self.quantized_norm.data_ptr(), block_score.data_ptr(),
                        block_bound.data_ptr())
        return block_score, block_bound

    def _scores(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The int8 product of the rows `x` (quantized: `levels` steps) with the screen's weights, `[rows, vocab]`."""
        if not self.native:
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, _STEP, _ZERO_POINT, self.packed)
        rows, hidden = x.shape
        vocab = self.row_sum.shape[0]
        if self.scores_out.numel() < rows * vocab:
            self.scores_out = torch.empty(rows * vocab)
        scores = self.scores_out[: rows * vocab].view(rows, vocab)
        activations = (levels + _ZERO_POINT).to(torch.uint8).contiguous()
        status = _kernel()(activations.data_ptr(), rows, hidden, vocab, self.packed.data_ptr(), self.row_sum.data_ptr(),
                           self.score_scale.data_ptr(), _ZERO_POINT, scores.data_ptr())
        if status:
            raise RuntimeError(f"int8_screen failed ({status}) for {rows} rows")
        return scores

    def _exact_logits(self, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """fp32 logit of `tokens[i]` for row `h[i]`. The floor and the candidates must come from this one
        computation: the anchor is itself a candidate, and its logit must reach the floor it set."""
        return (self.weight.index_select(0, tokens) * h).sum(1)
