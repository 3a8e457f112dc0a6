"""What the endpoint families share: the served model, token texts, request progress, and request lifetime
(errors before the first byte become proper statuses; a client that goes away cancels its request)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request, Response

from adapter.engine import Engine, EngineChunk, GenerationParams
from adapter.errors import ModelNotFoundError
from adapter.protocol import UsageInfo

# JSON has no -inf; vLLM reports impossible tokens as this.
MIN_LOGPROB = -9999.0


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int | None = None
    root: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def system_fingerprint(self) -> str:
        return "fp_" + hashlib.sha256(f"{self.name}:{self.root}".encode()).hexdigest()[:10]


def clamp_logprob(value: float | None) -> float | None:
    if value is None:
        return None
    if math.isnan(value) or value < MIN_LOGPROB:
        return MIN_LOGPROB
    return float(value)


@dataclass
class RequestProgress:
    """Counts and the end of one request, as the engine reports them."""

    params: GenerationParams
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_finish_reason: str | None = None
    engine_stop_reason: str | None = None

    def update(self, chunk: EngineChunk) -> None:
        if chunk.num_input_tokens is not None:
            self.prompt_tokens = chunk.num_input_tokens
        if chunk.num_output_tokens is not None:
            self.completion_tokens = chunk.num_output_tokens
        else:
            self.completion_tokens += len(chunk.token_ids)
        if chunk.finish_reason:
            self.engine_finish_reason = chunk.finish_reason
            self.engine_stop_reason = chunk.stop_reason

    def finish_reason(self) -> str:
        """OpenAI's: `length` when max_tokens ended it, else `stop`."""
        if self.engine_finish_reason in ("stop", "length"):
            return self.engine_finish_reason
        limit = self.params.max_tokens
        return "length" if limit and self.completion_tokens >= limit else "stop"

    def stop_reason(self) -> int | str | None:
        """vLLM's: the client's stop string or stop token id that ended it; None for EOS and length."""
        reason = self.engine_stop_reason
        if reason is None or self.finish_reason() != "stop":
            return None
        if reason in self.params.stop:
            return reason
        if reason.lstrip("-").isdigit() and int(reason) in self.params.stop_token_ids:
            return int(reason)
        return None

    def usage(self) -> UsageInfo:
        return UsageInfo.of(self.prompt_tokens, self.completion_tokens)


async def first_chunk(stream: AsyncIterator[EngineChunk]) -> EngineChunk | None:
    """Wait for the engine's first answer so that errors (bad input, full queue, Triton down) become a proper
    HTTP status instead of an error inside a 200 stream."""
    return await anext(stream, None)


async def chained(first: EngineChunk | None, rest: AsyncIterator[EngineChunk]) -> AsyncIterator[EngineChunk]:
    if first is not None:
        yield first
    async for chunk in rest:
        yield chunk


async def run_until_disconnected(raw: Request, work: Awaitable[Response]) -> Response:
    """Run a non-streamed request, cancelling it (and so the engine request) when the client goes away."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return Response(status_code=499)  # nobody is listening; nginx's "client closed request"


class OpenAIServing:
    """Base of the endpoint families: the engine, the tokenizer and the served model's identity."""

    def __init__(self, engine: Engine, model: ServedModel, tokenizer: TokenizerLike | None):
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model.name:
            raise ModelNotFoundError(name)

    def token_text(self, token_id: int) -> str:
        """A token's own text (for logprobs), from the tokenizer; cached."""
        text = self._token_texts.get(token_id)
        if text is None:
            tokenizer = self.tokenizer
            if tokenizer is None:
                text = ""
            elif hasattr(tokenizer, "id_to_token_text"):
                text = tokenizer.id_to_token_text(token_id)
            else:
                text = tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text
