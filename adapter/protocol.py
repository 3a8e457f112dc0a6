"""OpenAI's request and response shapes (with vLLM's extras), and the one mapping from API fields to engine
parameters: `SamplingRequest.to_generation_params`.

Requests accept unknown fields (logged, not rejected), as OpenAI clients send fields that a server may ignore.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from adapter.engine import GenerationParams
from adapter.errors import BadRequestError

logger = logging.getLogger("adapter.protocol")


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- requests -----------------------------------------------------------------------------------------------


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingRequest(OpenAIBaseModel):
    """The fields chat and completions share; `to_generation_params` is the only API -> engine mapping."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(default=None, ge=-1)  # -1 and 0: off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n < 1:
            raise ValueError("n must be at least 1")
        if n > 1:
            raise ValueError("n > 1 is not supported yet")
        return n

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        if self.model_extra:
            logger.warning("ignoring unsupported request fields: %s", ", ".join(sorted(self.model_extra)))
        return self

    # Per endpoint: the max_tokens asked for, and (return_log_probs, top_logprobs).
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_params(self) -> tuple[bool, int | None]:
        return False, None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def to_generation_params(self, *, add_special_tokens: bool | None = None) -> GenerationParams:
        if self.stream_options is not None and not self.stream:
            raise BadRequestError("stream_options is only allowed when stream is true.", param="stream_options")
        # OpenAI's default is sampling at temperature 1, not the engine's greedy default.
        temperature = 1.0 if self.temperature is None else self.temperature
        top_k = self.top_k
        if top_k is not None and top_k <= 0:
            top_k = None
        if temperature == 0.0:
            # Greedy: top_k = 1 means the same to every engine; temperature 0 is not valid everywhere.
            temperature, top_k = None, 1
        return_log_probs, top_logprobs = self.logprob_params()
        return GenerationParams(
            max_tokens=self.requested_max_tokens(),
            temperature=temperature,
            top_p=self.top_p,
            top_k=top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            min_tokens=self.min_tokens,
            stop=tuple(self.stop_list()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            add_special_tokens=add_special_tokens,
            return_log_probs=return_log_probs,
            top_logprobs=top_logprobs,
            stream=self.stream,
        )


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text":
                    raise ValueError(f"only text content parts are supported, not {part.get('type')!r}")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string 'text'")
        return content

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "\n".join(part["text"] for part in self.content)
        return self.content

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, `developer` read as `system`."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    # vLLM's chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_params(self) -> tuple[bool, int | None]:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequestError("logprobs must be true when top_logprobs is set.", param="top_logprobs")
        return (True, self.top_logprobs or 0) if self.logprobs else (False, None)

    def template_messages(self) -> list[dict[str, Any]]:
        if self.continue_final_message and self.add_generation_prompt:
            raise BadRequestError(
                "continue_final_message and add_generation_prompt cannot both be true.", param="continue_final_message"
            )
        return [m.to_template() for m in self.messages]


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    def logprob_params(self) -> tuple[bool, int | None]:
        return (True, self.logprobs) if self.logprobs is not None else (False, None)

    def prompt_input(self) -> str | list[int]:
        """The one prompt of this request: text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise BadRequestError("Batched prompts are not supported yet: send one prompt per request.",
                                      param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise BadRequestError("The prompt is empty.", param="prompt")
        return prompt


# --- responses ----------------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None
    refusal: list[ChatCompletionLogProbsContent] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that ended it


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _Chunk(BaseModel):
    """A streamed chunk: `usage` appears only on the usage chunk."""

    @model_serializer(mode="wrap")
    def _omit_null_usage(self, handler):
        data = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


class ChatCompletionChunk(_Chunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogProbs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionChunk(_Chunk):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "system"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
