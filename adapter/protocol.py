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


class SamplingExtras(OpenAIBaseModel):
    """vLLM's sampling extras; accepted at the top level and, as NIM does, under `nvext` with the same meaning."""

    top_k: int | None = Field(default=None, ge=-1)  # -1 and 0: off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None


EXTRA_FIELDS = tuple(SamplingExtras.model_fields)
MAX_CHOICES = 128  # n and best_of, as OpenAI's limit on n


class NVExt(SamplingExtras):
    """NIM's `nvext` object."""


class SamplingRequest(SamplingExtras):
    """The fields chat and completions share; `to_generation_params` is the only API -> engine mapping."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    nvext: NVExt | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[int, float] | None) -> dict[int, float] | None:
        for token_id, value in (bias or {}).items():
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100]; token {token_id} has {value}")
        return bias

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        unknown = sorted(self.model_extra or {})
        unknown += [f"nvext.{k}" for k in sorted((self.nvext.model_extra or {}) if self.nvext else {})]
        if unknown:
            logger.warning("ignoring unsupported request fields: %s", ", ".join(unknown))
        return self

    # Per endpoint: the max_tokens asked for, and (return_log_probs, top_logprobs).
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_params(self) -> tuple[bool, int | None]:
        return False, None

    def num_sequences(self) -> int:
        """Engine sequences sampled per prompt (completions' best_of may ask for more than the n returned)."""
        return self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def extra(self, name: str):
        """A vLLM extra from the top level or from `nvext` (the same field twice must agree)."""
        top = getattr(self, name)
        nested = getattr(self.nvext, name) if self.nvext is not None else None
        if top is not None and nested is not None and top != nested:
            raise BadRequestError(f"{name} is given at the top level and in nvext with different values.",
                                  param=f"nvext.{name}")
        return top if top is not None else nested

    def logit_bias_pairs(self, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
        pairs = tuple(sorted((self.logit_bias or {}).items()))
        for token_id, _ in pairs:
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                limit = f"[0, {vocab_size})" if vocab_size is not None else "non-negative"
                raise BadRequestError(f"logit_bias: token id {token_id} is not in the vocabulary {limit}.",
                                      param="logit_bias")
        return pairs

    def to_generation_params(
        self, *, add_special_tokens: bool | None = None, vocab_size: int | None = None
    ) -> GenerationParams:
        if self.stream_options is not None and not self.stream:
            raise BadRequestError("stream_options is only allowed when stream is true.", param="stream_options")
        self.num_sequences()  # n / best_of checks
        # OpenAI's default is sampling at temperature 1, not the engine's greedy default.
        temperature = 1.0 if self.temperature is None else self.temperature
        top_k = self.extra("top_k")
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
            min_p=self.extra("min_p"),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.extra("repetition_penalty"),
            seed=self.seed,
            min_tokens=self.extra("min_tokens"),
            stop=tuple(self.stop_list()),
            stop_token_ids=tuple(self.extra("stop_token_ids") or ()),
            logit_bias=self.logit_bias_pairs(vocab_size),
            ignore_eos=self.extra("ignore_eos"),
            skip_special_tokens=self.extra("skip_special_tokens"),
            include_stop_str_in_output=self.extra("include_stop_str_in_output"),
            add_special_tokens=add_special_tokens,
            return_log_probs=return_log_probs,
            top_logprobs=top_logprobs,
            stream=self.stream,
        )


class ChatMessage(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow", validate_by_name=True, validate_by_alias=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # NIM's: on the final assistant message, continue it instead of opening a new turn.
    continue_: bool = Field(default=False, alias="continue")

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
        return [m.to_template() for m in self.messages]

    def render_options(self) -> tuple[bool, bool]:
        """(add_generation_prompt, continue_final_message): continuing the final assistant message (top-level
        `continue_final_message`, or `"continue": true` on that message) opens no new turn."""
        last = len(self.messages) - 1
        for i, message in enumerate(self.messages):
            if message.continue_ and (i != last or message.role != "assistant"):
                raise BadRequestError("Only the final message, an assistant message, can be continued.",
                                      param=f"messages[{i}].continue")
        continue_final = self.continue_final_message or self.messages[last].continue_
        add_generation_prompt = self.add_generation_prompt
        if continue_final:
            if add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
                raise BadRequestError("continue_final_message and add_generation_prompt cannot both be true.",
                                      param="add_generation_prompt")
            add_generation_prompt = False
        return add_generation_prompt, continue_final


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    def logprob_params(self) -> tuple[bool, int | None]:
        if self.num_sequences() > self.n:
            # best_of ranks by cumulative log-probability, which the engine reports only with log probs.
            return True, self.logprobs or 0
        return (True, self.logprobs) if self.logprobs is not None else (False, None)

    def num_sequences(self) -> int:
        best_of = self.n if self.best_of is None else self.best_of
        if best_of < self.n:
            raise BadRequestError(f"best_of must be greater than or equal to n; got best_of={best_of}, n={self.n}.",
                                  param="best_of")
        if self.stream and best_of > 1 and self.best_of is not None:
            raise BadRequestError("best_of cannot be used with stream: the best choices are known only at the end.",
                                  param="best_of")
        return best_of

    def prompt_inputs(self) -> list[str | list[int]]:
        """The prompts of this request (a batch is a list of texts or of token-id lists), text or token ids."""
        if self.suffix:
            raise BadRequestError("suffix is not supported: this model has no fill-in-the-middle mode.",
                                  param="suffix")
        prompt = self.prompt
        prompts = list(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) \
            else [prompt]
        for i, one in enumerate(prompts):
            if (isinstance(one, list) and not one) or (one == "" and len(prompts) > 1):
                raise BadRequestError("The prompt is empty." if len(prompts) == 1 else f"Prompt {i} is empty.",
                                      param="prompt")
        return prompts


# --- responses ----------------------------------------------------------------------------------------------


def _without_null(data: dict, key: str) -> dict:
    """A serialized model without `key` where it is null: OpenAI leaves such keys out."""
    if data.get(key) is None:
        data.pop(key, None)
    return data


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # taken from the engine's KV cache (KV cache reuse) rather than computed


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # None: the engine does not report cached tokens

    @model_serializer(mode="wrap")
    def _without_unknown_details(self, handler):
        # An engine that does not count cached tokens (TensorRT-LLM's) leaves the key out rather than send null.
        return _without_null(handler(self), "prompt_tokens_details")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> "UsageInfo":
        details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


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
        return _without_null(handler(self), "usage")


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
