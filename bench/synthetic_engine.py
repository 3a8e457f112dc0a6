"""SYNTHETIC engine, for benchmarks only: the CPU engine's interface with no model behind it.

It answers every running request with one token per step, instantly, so a benchmark measures what the
serving stack (Triton's relay, postprocessing, the adapter, SSE) can deliver when the engine is not the
limit. Selected by ENGINE_KIND=synthetic; never loaded otherwise. SYNTHETIC_STEP_MS (environment) paces its
steps instead, like a real model's, without using the CPU: `bench.stack_cpu` measures what the stack costs per
token at the model's rate.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from engine import GenerationOutput, PromptTooLongError, QueueFullError, SamplingParams, stream_due


class _Request:
    def __init__(self, request_id, prompt, params, on_output):
        self.id, self.prompt, self.params, self.on_output = request_id, prompt, params, on_output
        self.generated = 0
        self.pending: list[int] = []


class SyntheticEngine:
    def __init__(self, max_batch_size: int = 64, max_seq_len: int = 4096, max_queue_size: int = 256,
                 stream_interval: int = 0):
        self.max_batch_size, self.max_seq_len, self.max_queue_size = max_batch_size, max_seq_len, max_queue_size
        self.stream_interval = stream_interval
        self.step_s = float(os.environ.get("SYNTHETIC_STEP_MS", "0")) / 1000
        self._step = 0
        self._cv = threading.Condition()
        self._live: dict[str, _Request] = {}
        self._cancels: set[str] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="synthetic-engine", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               on_output: Callable[[GenerationOutput], None]) -> None:
        params.validate()
        if len(prompt_ids) + params.max_new_tokens > self.max_seq_len:
            raise PromptTooLongError(f"context is {self.max_seq_len} tokens")
        with self._cv:
            if len(self._live) >= self.max_batch_size + self.max_queue_size:
                raise QueueFullError("the synthetic engine is full")
            self._live[request_id] = _Request(request_id, list(prompt_ids), params, on_output)
            self._cv.notify()

    def cancel(self, request_id: str) -> bool:
        with self._cv:
            if request_id not in self._live:
                return False
            self._cancels.add(request_id)
            self._cv.notify()
            return True

    def stats(self) -> dict:
        with self._cv:
            running = min(len(self._live), self.max_batch_size)
            return {"running": running, "waiting": len(self._live) - running}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._live):
                    self._cv.wait()
                if self._closed:
                    return
                cancels, self._cancels = self._cancels, set()
                batch = list(self._live.values())[: self.max_batch_size]
            step_started = time.monotonic()
            for request in batch:
                cancelled = request.id in cancels
                if not cancelled:
                    # Echo the prompt's tokens in a loop: real token ids, so detokenization does real work. From
                    # the second: the first is usually BOS, whose text is empty, and a client's first token is text.
                    request.pending.append(request.prompt[(request.generated + 1) % len(request.prompt)])
                    request.generated += 1
                finished = cancelled or request.generated >= request.params.max_new_tokens
                streamed = request.params.streaming and stream_due(self._step, request.generated, self.stream_interval,
                                                                   len(batch))
                if streamed or finished:
                    request.on_output(GenerationOutput(
                        request_id=request.id,
                        token_ids=request.pending,
                        finished=finished,
                        finish_reason=("cancelled" if cancelled else "length") if finished else None,
                        num_input_tokens=len(request.prompt),
                        num_output_tokens=request.generated,
                    ))
                    request.pending = []
                if finished:
                    with self._cv:
                        del self._live[request.id]
            self._step += 1
            if self.step_s and self._live:  # with nothing left running there is no next step to pace: a new
                # request starts at once, as it would on an idle engine
                time.sleep(max(0.0, step_started + self.step_s - time.monotonic()))
