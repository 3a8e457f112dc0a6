"""The adapter's one interface to whatever generates tokens (Triton's ensemble in production, a fake in tests).

`GenerationParams` is what an API request becomes (see `protocol.SamplingRequest.to_generation_params`), and
`EngineChunk` is one streamed piece of the answer. The serving layers know only these and `Engine`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class GenerationParams:
    """Engine parameters of one request; None means "not sent: the engine's default"."""

    max_tokens: int | None = None  # None: as many as the context leaves (sent as 0, our ensemble's extension)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    min_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's -100..100
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    add_special_tokens: bool | None = None
    return_log_probs: bool = False
    top_logprobs: int | None = None  # alternatives per position (with return_log_probs)
    stream: bool = True  # the client asked for a stream (the engine streams either way: see ensemble_inputs)


@dataclass
class EngineChunk:
    """One engine response: the new text and tokens since the previous one, and the running counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob) alternatives
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last response, else None
    stop_reason: str | None = None  # the stop string or end token id (as text) that ended it
    num_input_tokens: int | None = None
    num_cached_tokens: int | None = None  # of the prompt, taken from the engine's KV cache; on the last response
    num_output_tokens: int | None = None  # cumulative
    cum_log_prob: float | None = None

    @classmethod
    def merge(cls, chunks: Sequence[EngineChunk]) -> EngineChunk:
        """Consecutive responses of one request as one: text, tokens and logprobs joined; the running counts and
        the end as the latest response that reports them says."""
        if len(chunks) == 1:
            return chunks[0]

        def joined(name: str) -> list | None:
            parts = [part for part in (getattr(c, name) for c in chunks) if part is not None]
            return [item for part in parts for item in part] if parts else None

        def latest(name: str):
            return next((value for value in (getattr(c, name) for c in reversed(chunks)) if value is not None), None)

        return cls(
            text="".join(c.text for c in chunks),
            token_ids=[t for c in chunks for t in c.token_ids],
            log_probs=joined("log_probs"),
            top_logprobs=joined("top_logprobs"),
            finish_reason=latest("finish_reason"),
            stop_reason=latest("stop_reason"),
            num_input_tokens=latest("num_input_tokens"),
            num_cached_tokens=latest("num_cached_tokens"),
            num_output_tokens=latest("num_output_tokens"),
            cum_log_prob=latest("cum_log_prob"),
        )


class Engine(Protocol):
    def generate(
        self, request_id: str, prompt: str | list[int], params: GenerationParams
    ) -> AsyncIterator[EngineChunk]:
        """Stream the answer; closing the iterator early cancels the request in the engine."""
        ...

    async def cancel(self, request_id: str) -> None: ...

    async def is_ready(self) -> bool: ...

    async def close(self) -> None: ...
