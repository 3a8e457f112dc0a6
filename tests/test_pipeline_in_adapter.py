"""The adapter's own preprocessing and postprocessing (`adapter.pipeline_steps`) against Triton's ensemble, on a
real tritonserver: the same requests through both give the same answers, and the local path skips the
ensemble's postprocessing model."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest
import pytest_asyncio
from tritonclient.grpc.aio import InferenceServerClient

from adapter.engine import EngineChunk, GenerationParams
from adapter.errors import BadRequestError, ContextLengthError
from adapter.triton_engine import TritonEngine
from tokenization.tokenizer import Tokenizer

PROMPT = "The capital of France is"


@pytest_asyncio.fixture(loop_scope="function")
async def engines(tiny_stack):
    """(through the ensemble, with the steps in the adapter) against the tiny stack's Triton."""
    tokenizer = Tokenizer.from_dir(tiny_stack.model_dir)
    ensemble, local = TritonEngine(tiny_stack.grpc_url), TritonEngine(tiny_stack.grpc_url, tokenizer=tokenizer)
    yield ensemble, local
    await ensemble.close()
    await local.close()


async def answer(engine: TritonEngine, prompt, params: GenerationParams, request_id: str):
    """The whole answer as one chunk, and how many chunks it came in."""
    async with aclosing(engine.generate(request_id, prompt, params)) as chunks:
        collected = [chunk async for chunk in chunks]
    return EngineChunk.merge(collected), len(collected)


def same_answer(a: EngineChunk, b: EngineChunk) -> None:
    assert (a.text, a.token_ids) == (b.text, b.token_ids)
    assert (a.finish_reason, a.stop_reason) == (b.finish_reason, b.stop_reason)
    # The adapter counts the tokens it receives (RequestProgress) rather than asking the engine for its count.
    assert b.num_output_tokens == len(b.token_ids) and a.num_output_tokens in (None, len(a.token_ids))
    assert a.num_input_tokens == b.num_input_tokens
    assert (a.log_probs is None) == (b.log_probs is None)
    if a.log_probs is not None:  # a KV-cache hit may round the prompt's last position differently
        assert a.log_probs == pytest.approx(b.log_probs, abs=1e-3)
        assert [[t for t, _ in row] for row in a.top_logprobs] == [[t for t, _ in row] for row in b.top_logprobs]


async def test_steps_are_read_from_the_served_ensemble(engines):
    ensemble, local = engines
    await answer(local, PROMPT, GenerationParams(max_tokens=2), "steps-1")
    steps = local._steps  # noqa: SLF001
    assert steps is not None and steps.engine.model == "tensorrt_llm"
    assert steps.engine.input_map["input_ids"] == steps.preprocessing.output_map["INPUT_ID"]
    assert ensemble._steps is None  # noqa: SLF001 - no tokenizer: through the ensemble
    # The engine's echoes of the request's own inputs and its token count are not asked for: the adapter has
    # them (the answers below still match the ensemble's, token counts included).
    asked = steps.engine_outputs
    assert {"output_ids", "sequence_length", "finish_reason", "num_cached_tokens"} <= set(asked)
    assert not {"request_context", "num_input_tokens", "num_output_tokens"} & set(asked)


@pytest.mark.parametrize(
    ("prompt", "params"),
    [
        (PROMPT, GenerationParams(max_tokens=24, temperature=0.0)),
        ("Ünïcödé, 日本語 and emoji 👋🏽:", GenerationParams(max_tokens=24, temperature=0.0, return_log_probs=True,
                                                        top_logprobs=2)),
        ([2, 651, 6037, 529, 7001, 603], GenerationParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
        (PROMPT, GenerationParams(max_tokens=8, temperature=0.7, top_k=20, seed=11)),
    ],
)
async def test_same_answer_as_the_ensemble(engines, prompt, params):
    ensemble, local = engines
    through_ensemble, _ = await answer(ensemble, prompt, params, "same-ensemble")
    in_adapter, _ = await answer(local, prompt, params, "same-local")
    same_answer(in_adapter, through_ensemble)


async def test_stop_string_trims_and_stops_the_engine(engines):
    ensemble, local = engines
    full, _ = await answer(ensemble, PROMPT, GenerationParams(max_tokens=64, temperature=0.0), "stop-full")
    stop = full.text[len(full.text) // 3: len(full.text) // 3 + 3]
    assert stop.strip(), "need a visible stop string"
    params = GenerationParams(max_tokens=64, temperature=0.0, stop=(stop,))
    through_ensemble, _ = await answer(ensemble, PROMPT, params, "stop-ensemble")
    in_adapter, _ = await answer(local, PROMPT, params, "stop-local")
    assert in_adapter.text == through_ensemble.text == full.text[: full.text.index(stop)]
    assert (in_adapter.finish_reason, in_adapter.stop_reason) == ("stop", stop)
    assert len(in_adapter.token_ids) < 64  # the engine was stopped, not run to max_tokens


@pytest.mark.parametrize(
    ("prompt", "params", "error"),
    [
        ("word " * 300, GenerationParams(max_tokens=8), ContextLengthError),
        ([10**7], GenerationParams(max_tokens=8), BadRequestError),
    ],
)
async def test_same_errors_as_the_ensemble(engines, prompt, params, error):
    messages = []
    for engine in engines:
        with pytest.raises(error) as raised:
            await answer(engine, prompt, params, "bad")
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


async def test_postprocessing_model_is_skipped(tiny_stack, engines):
    ensemble, local = engines
    client = InferenceServerClient(tiny_stack.grpc_url)

    async def postprocessing_inferences(at_least: int = 0) -> int:
        # Inferences, not executions: Triton may batch two responses' postprocessing into one execution. And
        # Triton counts an execution once it has returned, which can be after its response reached the client.
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            stats = await client.get_inference_statistics("postprocessing", as_json=True)
            count = int(stats["model_stats"][0].get("inference_count", 0))  # JSON leaves a zero count out
            if count >= at_least or asyncio.get_running_loop().time() > deadline:
                return count
            await asyncio.sleep(0.05)

    try:
        before = await postprocessing_inferences()
        _, responses = await answer(local, PROMPT, GenerationParams(max_tokens=8), "skip-local")
        assert responses > 1 and await postprocessing_inferences() == before
        _, responses = await answer(ensemble, PROMPT, GenerationParams(max_tokens=8), "skip-ensemble")
        assert await postprocessing_inferences(at_least=before + responses) >= before + responses
    finally:
        await client.close()
