"""Next-token selection as pure functions over one row of fp32 logits `[vocab]`.

Order (as HF and vLLM): repetition / presence / frequency penalties, logit_bias, bad-word and min_tokens
masks -> log-probabilities -> temperature -> top_k -> top_p -> min_p -> sample (or argmax when greedy).

Log-probabilities are the log-softmax of the logits after penalties, bias and masks but before temperature
and top-k/top-p/min-p truncation: they describe the model's (adjusted) distribution and do not change with
temperature, as OpenAI's `logprobs` do not.
"""

import math
from dataclasses import dataclass

import torch

from .params import SamplingParams

NEG_INF = float("-inf")
NUCLEUS_CANDIDATES = 4096


@dataclass
class Choice:
    token: int
    log_prob: float | None
    top_logprobs: list[tuple[int, float]] | None


def block_size(vocab: int) -> int:
    """Tokens per block for the two-level scans below: 512 when the vocabulary divides into them (262k does),
    else its largest power-of-two divisor up to 512; 0 when that is under 64, too small to gain."""
    block = math.gcd(vocab, 512)
    return block if block >= 64 else 0


def argmax(logits: torch.Tensor, block_max: torch.Tensor | None = None) -> torch.Tensor:
    """`logits.argmax(-1)` of `[rows, vocab]` logits (first index among ties), for finite logits.

    torch.argmax scans serially (~1 GB/s, 0.25 ms per 262k-token row); the vectorised amax of blocks finds
    each row's first block holding its maximum, leaving argmax only that block to scan. `block_max`: those
    maxima `[rows, vocab / block_size(vocab)]`, when the caller has them already.
    """
    rows, vocab = logits.shape
    block = block_size(vocab)
    if not block:
        return logits.argmax(-1)
    blocks = logits.reshape(rows, vocab // block, block)
    if block_max is None:
        block_max = blocks.amax(-1)
    first = (block_max == block_max.amax(-1, keepdim=True)).to(torch.uint8).argmax(-1)
    return first * block + blocks[torch.arange(rows), first].argmax(-1)


def sample(logits: torch.Tensor, uniforms: torch.Tensor, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `[rows, vocab]` logits, drawn from their softmax (at `temperatures [rows]`, if
    given) by inverse CDF at `uniforms` (`[rows]` float64 in [0, 1), one per row from its request's
    generator, so rows do not affect each other).

    torch.multinomial takes ~7 ms per 262k-token row here; this takes one exp and one sum pass over the
    rows, then finds the block of 512 tokens holding the draw and the token within it.
    """
    rows, vocab = logits.shape
    weights = logits - logits.amax(-1, keepdim=True)
    if temperatures is not None:
        weights.div_(temperatures[:, None])
    weights.exp_()  # -inf (masked) -> 0
    block = block_size(vocab) or vocab  # a single block: one cumulative sum over the row
    blocks = weights.view(rows, vocab // block, block)
    ends = blocks.sum(-1).to(torch.float64).cumsum(-1)  # cumulative mass at each block's end
    targets = uniforms.to(torch.float64) * ends[:, -1]
    # side="right": the first block (then token) whose cumulative mass exceeds the target has mass > 0
    chosen = torch.searchsorted(ends, targets[:, None], side="right").clamp_(max=ends.shape[1] - 1)[:, 0]
    index = torch.arange(rows)
    before = torch.where(chosen > 0, ends[index, (chosen - 1).clamp(min=0)], 0.0)
    within = blocks[index, chosen].to(torch.float64).cumsum(-1)
    offset = torch.searchsorted(within, (targets - before)[:, None], side="right").clamp_(max=block - 1)[:, 0]
    return chosen * block + offset


def uniform(generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand((), dtype=torch.float64, generator=generator)


def plain_sampling(params: SamplingParams, num_generated: int) -> bool:
    """True when the next token is a temperature-scaled draw from the raw logits and nothing else is
    reported, so that rows like it can be sampled together by `sample`."""
    return (
        not params.greedy
        and plain_logits(params, num_generated)
        and params.top_k == 0
        and params.top_p == 1.0
        and params.min_p == 0.0
    )


def plain_logits(params: SamplingParams, num_generated: int) -> bool:
    """True when `process_logits` would change nothing and no log-probabilities are asked for."""
    return (
        params.repetition_penalty == 1.0
        and not (params.presence_penalty or params.frequency_penalty or params.logit_bias or params.bad_words)
        and (num_generated >= params.min_tokens or not params.end_ids)  # min_tokens masks only end ids
        and not (params.return_log_probs or params.top_logprobs)
    )


def plain_greedy(params: SamplingParams, num_generated: int) -> bool:
    """True when the next token is the argmax of the raw logits and nothing else is reported, so that
    `process_logits` and `choose` would only compute `argmax(logits)`."""
    return params.greedy and plain_logits(params, num_generated)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF / TensorRT-LLM: divide positive and multiply negative logits of seen tokens by `penalty`."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float):
    """OpenAI: subtract `frequency * count + presence * (count > 0)` for tokens generated so far."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    ids = torch.tensor(list(bias.keys()), dtype=torch.long)
    return logits.index_add(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype))


def banned_tokens(sequence: list[int], bad_words: list[list[int]]) -> list[int]:
    """Last tokens of the bad words whose earlier tokens end `sequence` (single tokens: always banned)."""
    banned = []
    for word in bad_words:
        prefix = word[:-1]
        if not prefix or (len(prefix) <= len(sequence) and sequence[len(sequence) - len(prefix) :] == prefix):
            banned.append(word[-1])
    return banned


def mask_tokens(logits: torch.Tensor, ids) -> torch.Tensor:
    logits = logits.clone()
    logits[list(ids)] = NEG_INF
    return logits


def truncate(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Set logits outside top_k, the top_p nucleus and the min_p floor to -inf (HF semantics)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        logits = nucleus(logits, top_p)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), NEG_INF)
    return logits


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens while the mass of those above them is below `top_p` (HF's top-p: the
    first always stays). Sorting a 262k-token row takes ~30 ms, so the nucleus is looked for among the
    top candidates first; only when they hold less than `top_p` of the mass is the whole row sorted."""
    probs = logits.softmax(-1)
    values, ids = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]))
    if float(values.sum()) < top_p:
        values, ids = torch.sort(probs, descending=True)
    mass_above = values.cumsum(-1) - values
    keep = ids[mass_above < top_p]
    kept = torch.full_like(logits, NEG_INF)
    kept[keep] = logits[keep]
    return kept


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    sequence: list[int],
    num_generated: int,
    seen: torch.Tensor | None,
    counts: torch.Tensor | None,
) -> torch.Tensor:
    """Penalties, bias and masks. `sequence` is prompt + generated tokens; `seen` (bool) and `counts`
    (generated-token counts) are `[vocab]` tensors, needed only when the matching penalty is set."""
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:
        logits = apply_presence_frequency(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    masked = banned_tokens(sequence, params.bad_words) if params.bad_words else []
    if num_generated < params.min_tokens:
        masked.extend(params.end_ids)
    if masked:
        logits = mask_tokens(logits, masked)
    return logits


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> Choice:
    """Pick the next token from processed logits; `generator` drives sampling (unused when greedy)."""
    if params.greedy:
        token = int(argmax(logits[None])[0])
    else:
        scaled = truncate(logits / params.temperature, params.top_k, params.top_p, params.min_p)
        token = int(sample(scaled[None], uniform(generator)[None])[0])
    if not (params.return_log_probs or params.top_logprobs):
        return Choice(token, None, None)
    log_probs = torch.log_softmax(logits, dim=-1)
    top = None
    if params.top_logprobs:
        values, ids = torch.topk(log_probs, params.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    return Choice(token, float(log_probs[token]), top)
