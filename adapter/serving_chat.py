"""`/v1/chat/completions`: messages through the chat template, then the engine; whole or streamed."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from adapter.engine import Engine, EngineChunk
from adapter.errors import BadRequestError
from adapter.protocol import (
    ChatCompletionChunk,
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
)
from adapter.metrics import Metrics
from adapter.serving_base import Generation, OpenAIServing, ServedModel, TokenizerLike, clamp_logprob
from adapter.sse import TextEvents

logger = logging.getLogger("adapter.chat")

# render(template, messages, *, add_generation_prompt, continue_final_message, bos_token, eos_token, tools, **kw)
ChatRenderer = Callable[..., str]
_RENDER_ARGS = {"add_generation_prompt", "continue_final_message", "bos_token", "eos_token", "tools", "messages"}


def default_renderer() -> ChatRenderer:
    from tokenization.chat_template import render_chat  # noqa: PLC0415 - the tokenization package is optional here

    return render_chat


class OpenAIServingChat(OpenAIServing):
    prompt_param = "messages"

    def __init__(
        self,
        engine: Engine,
        model: ServedModel,
        tokenizer: TokenizerLike | None,
        chat_template: str | None,
        render: ChatRenderer | None = None,
        metrics: Metrics | None = None,
        coalesce: bool = True,
    ):
        super().__init__(engine, model, tokenizer, metrics, coalesce)
        self.chat_template = chat_template
        self._render = render

    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(request.model)
        # The template already has BOS.
        params = request.to_generation_params(add_special_tokens=False, vocab_size=self.model.vocab_size)
        prompt = self.render_prompt(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        generation = self.generation(request_id, [prompt], params, request.n)
        return await self.respond(
            raw, generation, request.stream,
            lambda: self._chunks(request, request_id, generation),
            lambda: self._whole(request, request_id, generation),
        )

    def render_prompt(self, request: ChatCompletionRequest) -> str:
        if self.chat_template is None:
            raise BadRequestError(
                f"The model `{self.model.name}` has no chat template: start the server with NIM_CHAT_TEMPLATE "
                "naming a Jinja file, or use /v1/completions.",
                param="messages",
            )
        render = self._render or default_renderer()
        extra = {k: v for k, v in (request.chat_template_kwargs or {}).items() if k not in _RENDER_ARGS}
        add_generation_prompt, continue_final_message = request.render_options()
        try:
            return render(
                self.chat_template,
                request.template_messages(),
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                bos_token=_special_token(self.tokenizer, "bos"),
                eos_token=_special_token(self.tokenizer, "eos"),
                tools=request.tools,
                **extra,
            )
        except ValueError as exc:  # tokenization.chat_template.ChatTemplateError, raise_exception() in templates
            raise BadRequestError(str(exc), param="messages") from None

    async def _whole(self, request: ChatCompletionRequest, request_id: str, generation: Generation) -> Response:
        answers = await generation.answers()
        top_n = request.top_logprobs or 0
        response = ChatCompletionResponse(
            id=request_id,
            model=self.model.name,
            system_fingerprint=self.model.system_fingerprint,
            choices=[
                ChatCompletionResponseChoice(
                    index=index,
                    message=ChatResponseMessage(content=answers[k].text),
                    logprobs=(ChatCompletionLogProbs(content=self.logprobs_content(answers[k], top_n))
                              if request.logprobs else None),
                    finish_reason=generation.progress[k].finish_reason(),
                    stop_reason=generation.progress[k].stop_reason(),
                )
                for index, k in generation.selected(request.n)
            ],
            usage=generation.usage(),
        )
        return JSONResponse(response.model_dump(mode="json"))

    async def _chunks(
        self, request: ChatCompletionRequest, request_id: str, generation: Generation
    ) -> AsyncIterator[ChatCompletionChunk | str]:
        created = int(time.time())

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=request_id, created=created, model=self.model.name,
                system_fingerprint=self.model.system_fingerprint, choices=choices, usage=usage,
            )

        deltas = TextEvents(  # the common event, a text delta alone, made without pydantic
            lambda k, text: chunk([ChatCompletionStreamChoice(index=k, delta=DeltaMessage(content=text))]))

        for s in generation.sequences:
            yield chunk([ChatCompletionStreamChoice(index=s.index, delta=DeltaMessage(role="assistant", content=""))])
        async with aclosing(generation.events()) as events:
            async for k, engine_chunk in events:
                if engine_chunk is None:
                    progress = generation.progress[k]
                    yield chunk([ChatCompletionStreamChoice(index=k, delta=DeltaMessage(),
                                                            finish_reason=progress.finish_reason(),
                                                            stop_reason=progress.stop_reason())])
                    continue
                logprobs = None
                if request.logprobs and engine_chunk.token_ids:
                    content = self.logprobs_content(engine_chunk, request.top_logprobs or 0)
                    logprobs = ChatCompletionLogProbs(content=content)
                if logprobs is not None:
                    yield chunk([ChatCompletionStreamChoice(index=k, delta=DeltaMessage(content=engine_chunk.text),
                                                            logprobs=logprobs)])
                elif engine_chunk.text:
                    yield deltas(k, engine_chunk.text)
        if request.include_usage:
            yield chunk([], usage=generation.usage())

    def logprobs_content(self, chunk: EngineChunk, top_n: int) -> list[ChatCompletionLogProbsContent]:
        content = []
        for i, token_id in enumerate(chunk.token_ids):
            token = self.token_text(token_id)
            logprob = chunk.log_probs[i] if chunk.log_probs and i < len(chunk.log_probs) else None
            alternatives = chunk.top_logprobs[i] if chunk.top_logprobs and i < len(chunk.top_logprobs) else []
            content.append(
                ChatCompletionLogProbsContent(
                    token=token,
                    logprob=clamp_logprob(logprob) if logprob is not None else 0.0,
                    bytes=list(token.encode("utf-8")),
                    top_logprobs=[
                        ChatCompletionLogProb(token=(alt := self.token_text(alt_id)), logprob=clamp_logprob(value),
                                              bytes=list(alt.encode("utf-8")))
                        for alt_id, value in alternatives[:top_n]
                    ],
                )
            )
        return content


def _special_token(tokenizer: Any, kind: str) -> str | None:
    """The tokenizer's BOS/EOS text, whatever the attribute is called."""
    if tokenizer is None:
        return None
    for name in (f"{kind}_token", f"{kind}_token_text", f"{kind}_text"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, str):
            return value
    return None
