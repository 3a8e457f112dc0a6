"""The `postprocessing` step: exact incremental detokenization and stop strings, per request.

Streamed responses of one request arrive here in order (one instance), so each request keeps its decoder
between responses. When a stop string matches, the engine is told to stop, and nothing after it is sent.
`RequestPostprocessor` is one request's step on plain values; `Postprocessor` is the step on the ensemble's
tensors, keeping a `RequestPostprocessor` for each request in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.context import RequestContext
from pipeline.tensors import Tensors, scalar, string_tensor
from tokenization.postprocess import StreamDecoder
from tokenization.tokenizer import Tokenizer

# Engine outputs passed on unchanged when the engine sent them.
_PASSED_ON = (
    ("NUM_INPUT_TOKENS", "OUT_NUM_INPUT_TOKENS"),
    ("NUM_OUTPUT_TOKENS", "OUT_NUM_OUTPUT_TOKENS"),
    ("NUM_CACHED_TOKENS", "OUT_NUM_CACHED_TOKENS"),
    ("CUM_LOG_PROBS", "OUT_CUM_LOG_PROBS"),
    ("OUTPUT_LOG_PROBS", "OUT_OUTPUT_LOG_PROBS"),
    ("TOP_LOGPROB_IDS", "OUT_TOP_LOGPROB_IDS"),
    ("TOP_LOGPROB_VALUES", "OUT_TOP_LOGPROB_VALUES"),
)

# A request whose final response never came (its client vanished mid-way) is forgotten after this long.
STALE_AFTER_S = 600.0


@dataclass(frozen=True)
class Postprocessed:
    """One engine response of a request, postprocessed."""

    text: str  # the new text to send
    finish_reason: str  # "" until the request's last response
    stop_reason: str


class RequestPostprocessor:
    """One request's postprocessing, response by response: its decoder and its stop strings."""

    def __init__(self, tokenizer: Tokenizer, context: RequestContext, stop_engine: Callable[[str], None]):
        self.context = context
        self.stop_engine = stop_engine
        self.decoder = StreamDecoder(tokenizer, context.stop,
                                     include_stop_str_in_output=context.include_stop_str_in_output,
                                     skip_special_tokens=context.skip_special_tokens)
        self.stop_string: str | None = None  # the stop string that matched, once one has
        self.last_seen = time.monotonic()

    def __call__(self, token_ids: list[int], finish_reason: str = "", stop_reason: str = "") -> Postprocessed:
        """A response's new tokens, and on the last one the engine's finish and stop reasons."""
        self.last_seen = time.monotonic()
        already_stopped = self.stop_string is not None
        step = self.decoder.push(self._text_tokens(token_ids, finish_reason, stop_reason), finished=bool(finish_reason))
        if step.stop_string is not None and not already_stopped:
            self.stop_string = step.stop_string
            if not finish_reason:
                self.stop_engine(self.context.key)
        if self.stop_string is not None and finish_reason:
            finish_reason, stop_reason = "stop", self.stop_string
        return Postprocessed(step.text, finish_reason, stop_reason)

    def _text_tokens(self, token_ids: list[int], finish_reason: str, stop_reason: str) -> list[int]:
        """The engine returns the end or stop token that ended generation; its text is not part of the
        completion (as in vLLM) unless the client asked for stop strings in the output."""
        if (finish_reason == "stop" and not self.context.include_stop_str_in_output and stop_reason.isdigit()
                and token_ids and token_ids[-1] == int(stop_reason)):
            return token_ids[:-1]
        return token_ids


class Postprocessor:
    def __init__(self, tokenizer: Tokenizer, stop_engine: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.stop_engine = stop_engine
        # By the request's context as the engine echoes it, unchanged at every response (its key makes it unique):
        # the JSON is parsed once per request, not once per streamed token.
        self.streams: dict[str, RequestPostprocessor] = {}

    def request(self, echoed_context: str) -> RequestPostprocessor:
        """The postprocessing of the request whose responses echo `echoed_context`, made at its first response."""
        stream = self.streams.get(echoed_context)
        if stream is None:
            self._forget_stale()
            stream = RequestPostprocessor(self.tokenizer, RequestContext.from_json(echoed_context), self.stop_engine)
            self.streams[echoed_context] = stream
        return stream

    def __call__(self, inputs: Tensors) -> Tensors:
        echoed_context = scalar(inputs, "REQUEST_CONTEXT")
        tokens = inputs["TOKENS_BATCH"].reshape(-1)
        length = scalar(inputs, "SEQUENCE_LENGTH", len(tokens))
        token_ids = [int(t) for t in tokens[:length]]
        step = self.request(echoed_context)(token_ids, scalar(inputs, "FINISH_REASON", ""),
                                            scalar(inputs, "STOP_REASON", ""))
        if step.finish_reason:
            del self.streams[echoed_context]

        outputs = {
            "OUTPUT": np.array([[step.text.encode("utf-8")]], dtype=np.object_),
            "OUT_TOKEN_IDS": np.array([token_ids], dtype=np.int32),
        }
        # Only what the engine sent on (log probabilities when asked for, reasons and the cached prompt tokens on
        # the last response, the counts when asked for): each tensor is copied again by Triton and sent over gRPC
        # with every streamed token.
        if step.finish_reason:
            outputs["OUT_FINISH_REASON"] = string_tensor(step.finish_reason)
            outputs["OUT_STOP_REASON"] = string_tensor(step.stop_reason)
        for source, target in _PASSED_ON:
            if source in inputs:
                outputs[target] = inputs[source]
        return outputs

    def _forget_stale(self) -> None:
        cutoff = time.monotonic() - STALE_AFTER_S
        for key in [k for k, s in self.streams.items() if s.last_seen < cutoff]:
            del self.streams[key]
