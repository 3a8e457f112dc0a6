"""Hands the engine's outputs to Triton on a thread of their own, coalescing them when the sending lags.

The engine thread only queues an output (cheap) and goes on computing; this thread turns outputs into
Triton responses. Whatever piled up for a request while the previous responses were being sent goes out as
one response, so a fast engine (or a slow consumer) gets fewer, larger responses and the same tokens,
while a relay that keeps up still sends every step's token at once. `min_tokens` is a floor on tokens per
streamed response after the first, TensorRT-LLM's `stream_interval`; the first token always goes at once
so that the time to first token does not depend on it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from engine import GenerationOutput
from engine.generate import merge_outputs

log = logging.getLogger(__name__)

Target = TypeVar("Target")  # where a request's responses go, hashed by identity (the shell's Stream)


class OutputRelay(Generic[Target]):
    def __init__(self, send: Callable[[Target, GenerationOutput], None], min_tokens: int = 1):
        """`send(target, output)` delivers one (possibly merged) output; it runs on the relay's thread."""
        self._send = send
        self._min_tokens = max(1, min_tokens)
        self._cv = threading.Condition()
        self._queued: list[tuple[Target, GenerationOutput]] = []
        self._held: dict[Target, list[GenerationOutput]] = {}  # outputs below min_tokens, by target
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="output-relay", daemon=True)
        self._thread.start()

    def put(self, target: Target, output: GenerationOutput) -> None:
        with self._cv:
            self._queued.append((target, output))
            self._cv.notify()

    def close(self) -> None:
        """Send what is queued, then stop."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._queued or self._closed):
                    self._cv.wait()
                batch, self._queued = self._queued, []
                if not batch and self._closed:
                    return
            for target, outputs in self._by_target(batch):
                merged = merge_outputs(outputs)
                first = merged.num_output_tokens == len(merged.token_ids)
                if not (merged.finished or first) and len(merged.token_ids) < self._min_tokens:
                    self._held[target] = [merged]
                    continue
                try:
                    self._send(target, merged)
                except Exception:  # one broken stream must not stop the others
                    log.exception("sending a response for request %s failed", merged.request_id)

    def _by_target(self, batch: list[tuple[Target, GenerationOutput]]):
        """Each target's held and newly queued outputs, in order, targets in order of first appearance."""
        grouped: dict[Target, list[GenerationOutput]] = {}
        for target, output in batch:
            if target not in grouped:
                grouped[target] = self._held.pop(target, [])
            grouped[target].append(output)
        return grouped.items()
