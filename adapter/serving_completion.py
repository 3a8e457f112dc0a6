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
from adapter.serving_base import Generation, OpenAIServing, clamp_logprob
from adapter.sse import TextEvents


class OpenAIServingCompletion(OpenAIServing):
    prompt_param = "prompt"

    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        self.check_model(request.model)
        params = request.to_generation_params(add_special_tokens=True, vocab_size=self.model.vocab_size)
        prompts = request.prompt_inputs()
        if request.echo and request.logprobs is not None:
            raise BadRequestError("echo with logprobs is not supported yet.", param="echo")
        echoes = [self.prompt_text(p) if request.echo else "" for p in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generation = self.generation(request_id, prompts, params, request.num_sequences())
        return await self.respond(
            raw, generation, request.stream,
            lambda: self._chunks(request, request_id, generation, echoes),
            lambda: self._whole(request, request_id, generation, echoes),
        )

    def prompt_text(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        if self.tokenizer is None:
            raise BadRequestError("echo of a token-id prompt needs the tokenizer.", param="echo")
        return self.tokenizer.decode(list(prompt))

    async def _whole(
        self, request: CompletionRequest, request_id: str, generation: Generation, echoes: list[str]
    ) -> Response:
        answers = await generation.answers()
        echo = [echoes[s.prompt_index] for s in generation.sequences]
        logprobs = [CompletionLogProbs() if request.logprobs is not None else None for _ in answers]
        for k, answer in enumerate(answers):
            if logprobs[k] is not None:
                self.add_logprobs(logprobs[k], answer, request.logprobs or 0, len(echo[k]))
        response = CompletionResponse(
            id=request_id,
            model=self.model.name,
            system_fingerprint=self.model.system_fingerprint,
            choices=[
                CompletionResponseChoice(
                    index=index,
                    text=echo[k] + answers[k].text,
                    logprobs=logprobs[k],
                    finish_reason=generation.progress[k].finish_reason(),
                    stop_reason=generation.progress[k].stop_reason(),
                )
                for index, k in generation.selected(request.n)
            ],
            usage=generation.usage(),
        )
        return JSONResponse(response.model_dump(mode="json"))

    async def _chunks(
        self, request: CompletionRequest, request_id: str, generation: Generation, echoes: list[str]
    ) -> AsyncIterator[CompletionChunk | str]:
        # Streaming never has best_of > n, so sequence k is choice k.
        created = int(time.time())
        offsets = [len(echoes[s.prompt_index]) for s in generation.sequences]

        def chunk(choices: list[CompletionResponseChoice], usage: UsageInfo | None = None) -> CompletionChunk:
            return CompletionChunk(
                id=request_id, created=created, model=self.model.name,
                system_fingerprint=self.model.system_fingerprint, choices=choices, usage=usage,
            )

        texts = TextEvents(lambda k, text: chunk([CompletionResponseChoice(index=k, text=text)]))  # without pydantic

        for s in generation.sequences:
            if echoes[s.prompt_index]:
                yield chunk([CompletionResponseChoice(index=s.index, text=echoes[s.prompt_index])])
        async with aclosing(generation.events()) as events:
            async for k, engine_chunk in events:
                if engine_chunk is None:
                    progress = generation.progress[k]
                    yield chunk([CompletionResponseChoice(index=k, text="", finish_reason=progress.finish_reason(),
                                                          stop_reason=progress.stop_reason())])
                    continue
                logprobs = None
                if request.logprobs is not None and engine_chunk.token_ids:
                    logprobs = CompletionLogProbs()
                    offsets[k] = self.add_logprobs(logprobs, engine_chunk, request.logprobs, offsets[k])
                if logprobs is not None:
                    yield chunk([CompletionResponseChoice(index=k, text=engine_chunk.text, logprobs=logprobs)])
                elif engine_chunk.text:
                    yield texts(k, engine_chunk.text)
        if request.include_usage:
            yield chunk([], usage=generation.usage())

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
