"""The `preprocessing` step: prompt to token ids, stop and bad words to engine inputs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from pipeline.context import RequestContext
from pipeline.tensors import (
    InvalidRequest,
    Tensors,
    encode_word_lists,
    int_tensor,
    one_row,
    scalar,
    string_tensor,
    vector,
)
from tokenization.tokenizer import Tokenizer


def context_length_error(max_seq_len: int, prompt_tokens: int, completion_tokens: int) -> InvalidRequest:
    """OpenAI's wording, so clients that parse it (and people) recognise it."""
    return InvalidRequest(
        f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
        f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the prompt, {completion_tokens} for the "
        f"completion). Please reduce the length of the prompt or the completion."
    )


@dataclass
class Preprocessor:
    tokenizer: Tokenizer
    max_seq_len: int

    def __call__(self, inputs: Tensors, request_id: str = "") -> Tensors:
        one_row(inputs)
        prompt_ids = self._prompt_ids(inputs)
        max_tokens = self._max_tokens(inputs, len(prompt_ids))
        ignore_eos = bool(scalar(inputs, "IGNORE_EOS", False))

        end_id = scalar(inputs, "END_ID")
        eos_ids = sorted(self.tokenizer.eos_token_ids)
        if end_id is None:
            end_id = -1 if ignore_eos or not eos_ids else eos_ids[0]
        # The engine takes one end id; the model's other end tokens (Gemma's <end_of_turn>) and the
        # client's stop_token_ids become single-token stop words, which work on every engine.
        extra_end_ids = [] if ignore_eos else [t for t in eos_ids if t != end_id]
        stop_token_ids = [int(t) for t in vector(inputs, "STOP_TOKEN_IDS")]
        stop_words = [[t] for t in dict.fromkeys(extra_end_ids + stop_token_ids)]

        bad_words = [self.tokenizer.encode(word, add_special_tokens=False) for word in vector(inputs, "BAD_WORDS_DICT")]
        pad_id = scalar(inputs, "PAD_ID")
        if pad_id is None:
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else max(end_id, 0)

        context = RequestContext(
            key=request_id or f"pre-{uuid.uuid4().hex}",
            stop=[s for s in vector(inputs, "STOP_WORDS_DICT") if s],
            include_stop_str_in_output=bool(scalar(inputs, "INCLUDE_STOP_STR_IN_OUTPUT", False)),
            skip_special_tokens=bool(scalar(inputs, "SKIP_SPECIAL_TOKENS", True)),
        )
        return {
            "INPUT_ID": np.array([prompt_ids], dtype=np.int32),
            "REQUEST_INPUT_LEN": int_tensor(len(prompt_ids)),
            "REQUEST_OUTPUT_LEN_OUT": int_tensor(max_tokens),
            "BAD_WORDS_IDS": encode_word_lists([w for w in bad_words if w]),
            "STOP_WORDS_IDS": encode_word_lists(stop_words),
            "OUT_END_ID": int_tensor(end_id),
            "OUT_PAD_ID": int_tensor(pad_id),
            "REQUEST_CONTEXT": string_tensor(context.to_json()),
        }

    def _prompt_ids(self, inputs: Tensors) -> list[int]:
        token_ids = vector(inputs, "INPUT_TOKEN_IDS")  # Python ints already
        if token_ids:
            vocab_size = self.tokenizer.vocab_size
            if min(token_ids) < 0 or max(token_ids) >= vocab_size:
                bad = next(t for t in token_ids if not 0 <= t < vocab_size)
                raise InvalidRequest(f"token id {bad} is out of range [0, {vocab_size})")
            return token_ids
        text = scalar(inputs, "QUERY", "")
        add_special_tokens = bool(scalar(inputs, "ADD_SPECIAL_TOKENS", True))
        prompt_ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        return prompt_ids

    def _max_tokens(self, inputs: Tensors, prompt_tokens: int) -> int:
        """max_tokens <= 0 (our extension) means: as many as the context leaves, as vLLM does by default."""
        requested = int(scalar(inputs, "REQUEST_OUTPUT_LEN", 0))
        if prompt_tokens >= self.max_seq_len:
            raise context_length_error(self.max_seq_len, prompt_tokens, max(requested, 0))
        if requested <= 0:
            return self.max_seq_len - prompt_tokens
        if prompt_tokens + requested > self.max_seq_len:
            raise context_length_error(self.max_seq_len, prompt_tokens, requested)
        return requested
