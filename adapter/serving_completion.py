"""`/v1/completions`: a prompt (text or token ids) straight to the engine; whole or streamed."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from adapter.engine import EngineChunk
from adapter.errors import BadRequestError
from adapter.protocol import (
    CompletionChunk,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    UsageInfo,
)
from adapter.serving_base import (
    OpenAIServing,
    RequestProgress,
    chained,
    clamp_logprob,
    first_chunk,
    run_until_disconnected,
)
from adapter.sse import sse_response


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        self.check_model(request.model)
        params = request.to_generation_params(add_special_tokens=True)
        prompt = request.prompt_input()
        if request.echo and request.logprobs is not None:
            raise BadRequestError("echo with logprobs is not supported yet.", param="echo")
        echo = self.prompt_text(prompt) if request.echo else ""
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = self.engine.generate(request_id, prompt, params)
        progress = RequestProgress(params)
        if request.stream:
            first = await first_chunk(stream)
            return sse_response(self._chunks(request, request_id, progress, echo, chained(first, stream)))
        return await run_until_disconnected(raw, self._whole(request, request_id, progress, echo, stream))

    def prompt_text(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise BadRequestError("echo of a token-id prompt needs the tokenizer.", param="echo")
        return self.tokenizer.decode(list(prompt))

    async def _whole(
        self, request: CompletionRequest, request_id: str, progress: RequestProgress, echo: str,
        stream: AsyncIterator[EngineChunk],
    ) -> Response:
        text = [echo]
        logprobs = CompletionLogProbs() if request.logprobs is not None else None
        offset = len(echo)
        async with aclosing(stream):
            async for chunk in stream:
                progress.update(chunk)
                text.append(chunk.text)
                if logprobs is not None:
                    offset = self.add_logprobs(logprobs, chunk, request.logprobs or 0, offset)
        response = CompletionResponse(
            id=request_id,
            model=self.model.name,
            system_fingerprint=self.model.system_fingerprint,
            choices=[
                CompletionResponseChoice(
                    text="".join(text),
                    logprobs=logprobs,
                    finish_reason=progress.finish_reason(),
                    stop_reason=progress.stop_reason(),
                )
            ],
            usage=progress.usage(),
        )
        return JSONResponse(response.model_dump(mode="json"))

    async def _chunks(
        self, request: CompletionRequest, request_id: str, progress: RequestProgress, echo: str,
        stream: AsyncIterator[EngineChunk],
    ) -> AsyncIterator[CompletionChunk]:
        created = int(time.time())
        offset = len(echo)

        def chunk(choices: list[CompletionResponseChoice], usage: UsageInfo | None = None) -> CompletionChunk:
            return CompletionChunk(
                id=request_id, created=created, model=self.model.name,
                system_fingerprint=self.model.system_fingerprint, choices=choices, usage=usage,
            )

        if echo:
            yield chunk([CompletionResponseChoice(text=echo)])
        async with aclosing(stream):
            async for engine_chunk in stream:
                progress.update(engine_chunk)
                logprobs = None
                if request.logprobs is not None and engine_chunk.token_ids:
                    logprobs = CompletionLogProbs()
                    offset = self.add_logprobs(logprobs, engine_chunk, request.logprobs, offset)
                if engine_chunk.text or logprobs is not None:
                    yield chunk([CompletionResponseChoice(text=engine_chunk.text, logprobs=logprobs)])
        yield chunk([CompletionResponseChoice(text="", finish_reason=progress.finish_reason(),
                                              stop_reason=progress.stop_reason())])
        if request.include_usage:
            yield chunk([], usage=progress.usage())

    def add_logprobs(self, logprobs: CompletionLogProbs, chunk: EngineChunk, top_n: int, offset: int) -> int:
        """Append one engine chunk's tokens to the legacy logprobs shape; returns the next text offset."""
        for i, token_id in enumerate(chunk.token_ids):
            token = self.token_text(token_id)
            logprob = chunk.log_probs[i] if chunk.log_probs and i < len(chunk.log_probs) else None
            alternatives = chunk.top_logprobs[i] if chunk.top_logprobs and i < len(chunk.top_logprobs) else []
            top = {self.token_text(alt_id): clamp_logprob(value) for alt_id, value in alternatives[:top_n]}
            if logprob is not None:
                top.setdefault(token, clamp_logprob(logprob))  # vLLM: the chosen token is always listed
            logprobs.tokens.append(token)
            logprobs.token_logprobs.append(clamp_logprob(logprob))
            logprobs.top_logprobs.append(top)
            logprobs.text_offset.append(offset)
            offset += len(token)
        return offset
