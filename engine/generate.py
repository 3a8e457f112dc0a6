"""Blocking in-process helper: run one request to completion."""

import threading
import uuid

from .engine import Engine, GenerationOutput
from .params import SamplingParams


def generate(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
    timeout: float | None = None,
) -> GenerationOutput:
    """Submit, wait for the final output and return all outputs merged into one."""
    request_id = request_id or uuid.uuid4().hex
    outputs: list[GenerationOutput] = []
    done = threading.Event()

    def on_output(output: GenerationOutput) -> None:
        outputs.append(output)
        if output.finished:
            done.set()

    engine.submit(request_id, prompt_ids, params, on_output)
    if not done.wait(timeout):
        engine.cancel(request_id)
        raise TimeoutError(f"request {request_id} did not finish within {timeout} s")
    return merge_outputs(outputs)


def merge_outputs(outputs: list[GenerationOutput]) -> GenerationOutput:
    """Consecutive outputs of one request as one: their tokens in order, the last one's state."""
    last = outputs[-1]
    return GenerationOutput(
        request_id=last.request_id,
        token_ids=[t for o in outputs for t in o.token_ids],
        log_probs=[lp for o in outputs for lp in o.log_probs] if last.log_probs is not None else None,
        top_logprobs=[top for o in outputs for top in o.top_logprobs] if last.top_logprobs is not None else None,
        finished=last.finished,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        num_input_tokens=last.num_input_tokens,
        num_cached_tokens=last.num_cached_tokens,
        num_output_tokens=last.num_output_tokens,
        cum_log_prob=last.cum_log_prob,
        error=last.error,
    )
