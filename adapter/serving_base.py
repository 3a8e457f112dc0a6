"""What the endpoint families share: the served model, token texts, request progress, request lifetime (errors
before the first byte become proper statuses; a client that goes away cancels its request), and the fan-out of
one API request into engine sequences (`n`, `best_of`, batched prompts) whose answers arrive interleaved."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fastapi import Request, Response
from pydantic import BaseModel

from adapter.engine import Engine, EngineChunk, GenerationParams
from adapter.errors import ContextLengthError, ModelNotFoundError
from adapter.metrics import Metrics
from adapter.protocol import UsageInfo
from adapter.sse import sse_response

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
    vocab_size: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @functools.cached_property  # read by every streamed chunk
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
    cached_tokens: int | None = None  # None: the engine did not say
    completion_tokens: int = 0
    engine_finish_reason: str | None = None
    engine_stop_reason: str | None = None
    cum_log_prob: float | None = None
    first_token_at: float | None = None  # time.monotonic()
    ended_at: float | None = None

    def update(self, chunk: EngineChunk) -> None:
        if self.first_token_at is None and (chunk.token_ids or chunk.text):
            self.first_token_at = time.monotonic()
        if chunk.cum_log_prob is not None:
            self.cum_log_prob = chunk.cum_log_prob
        if chunk.num_input_tokens is not None:
            self.prompt_tokens = chunk.num_input_tokens
        if chunk.num_cached_tokens is not None:
            self.cached_tokens = chunk.num_cached_tokens
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
        return UsageInfo.of(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


async def first_chunk(stream: AsyncIterator[EngineChunk]) -> EngineChunk | None:
    """Wait for the engine's first answer so that errors (bad input, full queue, Triton down) become a proper
    HTTP status instead of an error inside a 200 stream."""
    return await anext(stream, None)


async def _first_or_error(stream: AsyncIterator[EngineChunk]) -> EngineChunk | None | Exception:
    """`first_chunk`, with an error returned as `asyncio.gather(..., return_exceptions=True)` returns it."""
    try:
        return await first_chunk(stream)
    except Exception as exc:  # noqa: BLE001 - handed to Generation.start
        return exc


async def chained(first: EngineChunk | None, rest: AsyncIterator[EngineChunk]) -> AsyncIterator[EngineChunk]:
    async with aclosing(rest):  # closing this closes the engine stream (and so cancels its request)
        if first is not None:
            yield first
        async for chunk in rest:
            yield chunk


async def merged(streams: list[AsyncIterator[EngineChunk]],
                 coalesce: bool) -> AsyncIterator[tuple[int, EngineChunk | None]]:
    """The streams' chunks as they arrive, as (stream index, chunk), and (index, None) when a stream ends.

    The streams are read in the background, so chunks wait here while the reader is busy (an SSE client that
    reads slower than the engine writes). With `coalesce`, what waits comes out as one chunk per stream
    (`EngineChunk.merge`): a lagging client gets fewer, larger events, and one that keeps up still gets every
    chunk alone, since nothing waits for more to arrive. The first error of any stream ends the whole, after the
    chunks before it; closing this closes (and so cancels) every stream."""
    queue: asyncio.Queue[tuple[int, EngineChunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[EngineChunk]) -> None:
        try:
            async with aclosing(stream):
                async for chunk in stream:
                    queue.put_nowait((index, chunk, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            waiting = [await queue.get()]
            while coalesce and not queue.empty() and waiting[-1][2] is None:
                waiting.append(queue.get_nowait())
            error = waiting[-1][2]  # draining stops at an error: the chunks before it still go out
            for index, chunk in _merged_per_stream([(i, c) for i, c, e in waiting if e is None]):
                if chunk is None:
                    running -= 1
                yield index, chunk
            if error is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _merged_per_stream(items: list[tuple[int, EngineChunk | None]]) -> list[tuple[int, EngineChunk | None]]:
    """Each stream's chunks among `items` as one, in order of first arrival; the ends after them."""
    chunks: dict[int, list[EngineChunk]] = {}
    for index, chunk in items:
        if chunk is not None:
            chunks.setdefault(index, []).append(chunk)
    ends = [(index, None) for index, chunk in items if chunk is None]
    return [(index, EngineChunk.merge(c)) for index, c in chunks.items()] + ends


@dataclass(frozen=True)
class Sequence:
    """One engine request of an API request: choice `index` of prompt `prompt_index`."""

    index: int
    prompt_index: int
    prompt: str | list[int]
    params: GenerationParams
    request_id: str


def fan_out(request_id: str, prompts: list[str | list[int]], params: GenerationParams,
            per_prompt: int) -> list[Sequence]:
    """`per_prompt` engine sequences for each prompt, with ids `<id>-<k>` (just `<id>` for a single one). With a
    seed, sequence i of a prompt samples with seed + i: the choices differ, and the same request reproduces them."""
    single = len(prompts) == 1 and per_prompt == 1
    sequences = []
    for p, prompt in enumerate(prompts):
        for i in range(per_prompt):
            k = p * per_prompt + i
            seeded = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
            sequences.append(Sequence(k, p, prompt, seeded, request_id if single else f"{request_id}-{k}"))
    return sequences


class Generation:
    """The engine sequences of one API request: started together, read interleaved, counted together."""

    def __init__(self, engine: Engine, sequences: list[Sequence], metrics: Metrics | None = None,
                 coalesce: bool = True):
        self.sequences = sequences
        self.progress = [RequestProgress(s.params) for s in sequences]
        self.metrics = metrics
        self.coalesce = coalesce  # see `merged`
        self.started_at = time.monotonic()
        self._streams: list[AsyncIterator[EngineChunk]] = [
            engine.generate(s.request_id, s.prompt, s.params) for s in sequences
        ]

    async def start(self) -> None:
        """Wait for every sequence's first answer (see `first_chunk`); on any error, cancel them all."""
        if len(self._streams) == 1:  # the usual request: awaited here, not in a task (two more turns of the loop)
            firsts = [await _first_or_error(self._streams[0])]
        else:
            firsts = await asyncio.gather(*(first_chunk(s) for s in self._streams), return_exceptions=True)
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            for stream in self._streams:
                await stream.aclose()
            raise errors[0]
        self._streams = [chained(f, s) for f, s in zip(firsts, self._streams)]

    async def events(self) -> AsyncIterator[tuple[int, EngineChunk | None]]:
        """(sequence index, chunk) in arrival order, progress already updated; (index, None) when it ended. With
        `coalesce`, a chunk is all of that sequence's that waited to be read (see `merged`)."""
        async with aclosing(merged(self._streams, self.coalesce)) as chunks:
            async for index, chunk in chunks:
                progress = self.progress[index]
                if chunk is None:
                    progress.ended_at = time.monotonic()
                else:
                    progress.update(chunk)
                yield index, chunk
        self._record()

    async def answers(self) -> list[EngineChunk]:
        """Every sequence read to its end, each one's chunks merged into one (the non-streamed answer)."""
        chunks: list[list[EngineChunk]] = [[] for _ in self.sequences]
        async with aclosing(self.events()) as events:
            async for index, chunk in events:
                if chunk is not None:
                    chunks[index].append(chunk)
        return [EngineChunk.merge(c) for c in chunks]

    def selected(self, n: int) -> list[tuple[int, int]]:
        """(output choice index, sequence index): per prompt, its `n` sequences of highest cumulative
        log-probability (best_of), or all of them in order when there are only n."""
        out: list[tuple[int, int]] = []
        prompts = sorted({s.prompt_index for s in self.sequences})
        for p in prompts:
            candidates = [s.index for s in self.sequences if s.prompt_index == p]
            if len(candidates) > n:
                candidates = sorted(candidates, key=lambda k: self._rank(k), reverse=True)[:n]
            out += [(p * n + rank, k) for rank, k in enumerate(candidates)]
        return out

    def _rank(self, index: int) -> float:
        cum = self.progress[index].cum_log_prob
        return -math.inf if cum is None or math.isnan(cum) else cum

    def usage(self) -> UsageInfo:
        """OpenAI's: each prompt counted once, the tokens of every sampled sequence (best_of's too)."""
        prompt_tokens, cached_tokens = self._prompt_tokens()
        return UsageInfo.of(prompt_tokens, sum(p.completion_tokens for p in self.progress), cached_tokens)

    def _prompt_tokens(self) -> tuple[int, int | None]:
        """Each prompt's tokens, and those of them the engine took from its KV cache (None: not reported), as
        its first sequence says."""
        firsts: dict[int, RequestProgress] = {}
        for s, p in zip(self.sequences, self.progress):
            firsts.setdefault(s.prompt_index, p)
        cached = [p.cached_tokens for p in firsts.values()]
        return sum(p.prompt_tokens for p in firsts.values()), None if None in cached else sum(cached)

    def _record(self) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_prompt(*self._prompt_tokens())
        for s, p in zip(self.sequences, self.progress):
            # Time to first token is recorded for streamed requests: only their clients see a first token.
            first = p.first_token_at - self.started_at if p.first_token_at is not None and s.params.stream else None
            self.metrics.observe_sequence(finish_reason=p.finish_reason(), output_tokens=p.completion_tokens,
                                          first_token_s=first, e2e_s=(p.ended_at or time.monotonic()) - self.started_at)


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

    prompt_param = "prompt"  # the request field that an over-long prompt is blamed on

    def __init__(self, engine: Engine, model: ServedModel, tokenizer: TokenizerLike | None,
                 metrics: Metrics | None = None, coalesce: bool = True):
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.coalesce = coalesce  # merge the chunks that wait for a slow client (NIM_SSE_COALESCE)
        self._token_texts: dict[int, str] = {}

    def generation(self, request_id: str, prompts: list[str | list[int]], params: GenerationParams,
                   per_prompt: int) -> Generation:
        return Generation(self.engine, fan_out(request_id, prompts, params, per_prompt), self.metrics, self.coalesce)

    async def respond(
        self,
        raw: Request,
        generation: Generation,
        stream: bool,
        chunks: Callable[[], AsyncIterator[BaseModel | str]],
        whole: Callable[[], Awaitable[Response]],
    ) -> Response:
        """Streamed: wait for the first answers (errors become statuses), then SSE. Whole: generate, cancelling
        when the client goes away."""
        try:
            if stream:
                await generation.start()
                return sse_response(chunks())
            return await run_until_disconnected(raw, whole())
        except ContextLengthError as exc:
            exc.param = self.prompt_param
            raise

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
