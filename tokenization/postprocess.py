"""Streaming postprocessing of generated tokens: text deltas with stop strings applied."""

from __future__ import annotations

from dataclasses import dataclass

from tokenization.detokenizer import IncrementalDetokenizer
from tokenization.stop_strings import StopStringMatcher
from tokenization.tokenizer import Tokenizer


@dataclass(frozen=True)
class DecodeStep:
    text: str  # new text to send for this step
    stop_string: str | None  # the stop string that ended generation, once one has
    done: bool  # nothing more will come: a stop string matched or the engine finished


class StreamDecoder:
    """Detokenizes one request's generated tokens step by step and trims them at stop strings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop_strings: list[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ):
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stops = StopStringMatcher(stop_strings, include_stop_str_in_output)

    def push(self, token_ids: list[int], finished: bool) -> DecodeStep:
        """Adds this step's tokens; finished=True (the engine's last response) releases everything held back."""
        if self._stops.matched is not None:
            return DecodeStep("", self._stops.matched, True)
        text, stop = self._stops.push(self._detokenizer.push(token_ids))
        if stop is None and finished:
            more, stop = self._stops.push(self._detokenizer.flush())
            text += more
            if stop is None:
                text += self._stops.flush()
        return DecodeStep(text, stop, finished or stop is not None)
