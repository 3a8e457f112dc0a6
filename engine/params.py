"""Per-request sampling parameters."""

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_new_tokens: int
    end_ids: set[int] = field(default_factory=set)  # empty: never stop on a token (ignore eos)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # multiplicative on prompt + generated tokens (HF / TensorRT-LLM)
    presence_penalty: float = 0.0  # additive on generated tokens (OpenAI)
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # end ids and stop words are ignored until this many tokens are generated
    stop_words: list[list[int]] = field(default_factory=list)  # matched on generated tokens
    bad_words: list[list[int]] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    return_log_probs: bool = False
    top_logprobs: int = 0
    streaming: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field."""

        def bad(msg):
            raise ValueError(msg)

        def finite(name, value):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(f"{name} must be a finite number, got {value!r}")

        def token(name, t):
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                bad(f"{name} contains {t!r}, not a token id in [0, {vocab_size})")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            finite(name, getattr(self, name))
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0 or self.seed >= 2**64):
            bad(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            bad(f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
        for t in self.end_ids:
            token("end_ids", t)
        for name in ("stop_words", "bad_words"):
            for seq in getattr(self, name):
                if not isinstance(seq, (list, tuple)) or not seq:
                    bad(f"{name} entries must be non-empty token id lists, got {seq!r}")
                for t in seq:
                    token(name, t)
        for t, bias in self.logit_bias.items():
            token("logit_bias", t)
            finite(f"logit_bias[{t}]", bias)
