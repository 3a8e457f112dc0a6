"""The benchmarks' SYNTHETIC engine (bench/synthetic_engine.py): the tokens it streams, and its pacing."""

from __future__ import annotations

import threading
import time

import pytest

from bench.synthetic_engine import SyntheticEngine
from engine import SamplingParams


def stream(engine: SyntheticEngine, prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
    """The token ids one request streams, and when each output arrived."""
    done, ids, times = threading.Event(), [], []

    def on_output(output):
        ids.extend(output.token_ids)
        times.append(time.monotonic())
        if output.finished:
            done.set()

    engine.submit("r", prompt, SamplingParams(max_new_tokens=tokens), on_output)
    assert done.wait(10)
    return ids, times


@pytest.mark.parametrize("step_ms", [0.0, 20.0])
def test_streams_the_prompt_back_one_token_a_step_paced_by_step_ms(monkeypatch, step_ms):
    monkeypatch.setenv("SYNTHETIC_STEP_MS", str(step_ms))  # as bench.stack_cpu sets it for the stack
    engine = SyntheticEngine(max_batch_size=2, stream_interval=1)
    try:
        ids, times = stream(engine, [2, 10, 11, 12], 10)
    finally:
        engine.close()
    assert ids == [10, 11, 12, 2, 10, 11, 12, 2, 10, 11]  # the prompt from its second token, in a loop
    assert len(times) == 10  # one response a step
    took = times[-1] - times[0]
    if step_ms:
        assert took >= 9 * step_ms / 1000 * 0.9, "steps were not paced"
    else:
        assert took < 0.1, "an unpaced synthetic engine answers instantly"
