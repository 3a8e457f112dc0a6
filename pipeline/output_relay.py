"""Hands the engine's outputs to Triton on a thread of their own, coalescing them when the sending lags.

The engine thread only queues an output (cheap) and goes on computing; this thread turns outputs into
Triton responses. Whatever piled up for a request while the previous responses were being sent goes out as
one response, so a fast engine (or a slow consumer) gets fewer, larger responses and the same tokens,
while a relay that keeps up sends each output as the engine hands it over. How often the engine hands
outputs over is its `stream_interval` (`engine.stream_due`).
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
    def __init__(self, send: Callable[[Target, GenerationOutput], None]):
        """`send(target, output)` delivers one (possibly merged) output; it runs on the relay's thread."""
        self._send = send
        self._cv = threading.Condition()
        self._queued: list[tuple[Target, GenerationOutput]] = []
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
            for target, outputs in _by_target(batch):
                merged = merge_outputs(outputs)
                try:
                    self._send(target, merged)
                except Exception:  # one broken stream must not stop the others
                    log.exception("sending a response for request %s failed", merged.request_id)


def _by_target(batch: list[tuple[Target, GenerationOutput]]):
    """Each target's queued outputs, in order, targets in order of first appearance."""
    grouped: dict[Target, list[GenerationOutput]] = {}
    for target, output in batch:
        grouped.setdefault(target, []).append(output)
    return grouped.items()
