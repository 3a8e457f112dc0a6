"""Streaming detokenization: turn generated token ids into text a few tokens at a time, exactly."""

from __future__ import annotations

from tokenization.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Emits text as tokens arrive; all pushes plus flush() equal tokenizer.decode(all ids).

    vLLM's prefix/read offsets: each step decodes only a window that starts at the previously emitted tokens and
    returns the difference from decoding that window without the new tokens, so decoders that treat the first
    token specially (dropping its leading space) agree with a full decode, at O(window) cost per step.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: tokens already emitted, decoded again only as context
        self._read_offset = 0  # end of the emitted tokens; later ones are pending
        # Whether the last token the decoder sees is a byte-fallback piece. The ByteFallback decoder turns a whole
        # run of byte pieces into U+FFFD per byte when the run is not valid UTF-8, so a run's text (even "A" from
        # <0x41>) is only final once a non-byte token closes it.
        self._byte_run_open = False

    def push(self, token_ids: list[int]) -> str:
        """Adds generated tokens; returns the text that became final."""
        for token_id in token_ids:
            self._ids.append(int(token_id))  # Triton hands over numpy integers
            if not (self._skip_special_tokens and token_id in self._tokenizer.special_token_ids):
                self._byte_run_open = self._tokenizer.byte_value(token_id) is not None
        if self._byte_run_open:
            return ""
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns whatever is still held back, at the end of generation."""
        self._byte_run_open = False
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        emitted = self._read_offset - self._prefix_offset
        prefix_text = self._tokenizer.decode(window[:emitted], self._skip_special_tokens)
        text = self._tokenizer.decode(window, self._skip_special_tokens)
        # A trailing U+FFFD is an unfinished multi-byte character (byte-level tokenizers): wait for its other bytes.
        if not final and (len(text) <= len(prefix_text) or text.endswith("\ufffd")):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix_text) :]
