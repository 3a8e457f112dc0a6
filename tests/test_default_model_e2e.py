"""End to end on the real default model (Gemma 3 270M): the openai client through the adapter, and
tritonclient over gRPC on the ensemble, both against one running stack."""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.triton_calls import Result, TritonStream, engine_inputs, generate, wait_for_gauge

# transformers' greedy continuation of this prompt on the same weights (see tests/test_default_model.py).
PROMPT = "The capital of France is"
REFERENCE = " the capital of the country of France. It is the largest city in France"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(default_stack) -> OpenAI:
    return OpenAI(base_url=default_stack.openai_base_url, api_key="not-needed", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client, default_stack):
    assert [m.id for m in client.models.list().data] == [default_stack.model_name]


def test_completion_matches_transformers_greedy(client, default_stack):
    completion = client.completions.create(model=default_stack.model_name, prompt=PROMPT, max_tokens=16,
                                           temperature=0)
    assert completion.choices[0].text.startswith(REFERENCE[:40])
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 16
    assert completion.usage.prompt_tokens == 6  # <bos> + 5 words


def test_grpc_ensemble_gives_the_same_text(client, default_stack):
    completion = client.completions.create(model=default_stack.model_name, prompt=PROMPT, max_tokens=16,
                                           temperature=0)
    result = generate(default_stack.grpc_url, PROMPT, 16, stream=True)
    assert result.error is None
    assert result.text == completion.choices[0].text


def test_chat_streamed_equals_non_streamed(client, default_stack):
    messages = [{"role": "system", "content": "Answer in Japanese."},
                {"role": "user", "content": "Say good morning in Japanese, with an emoji."}]
    whole = client.chat.completions.create(model=default_stack.model_name, messages=messages, max_tokens=24,
                                           temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=default_stack.model_name, messages=messages,
                                                 max_tokens=24, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert len({c.id for c in chunks}) == 1


def test_a_grpc_client_that_cancels_its_stream_frees_the_engine(default_stack):
    # Triton tells the engine model that its client went away (`is_cancelled()`, asked at every response), and the
    # engine stops the request at its next step instead of generating the rest of its 1,000 tokens (~20 s here).
    connection = TritonStream(default_stack.grpc_url)
    try:
        connection.send("tensorrt_llm", engine_inputs([2, 651, 6037, 529], 1000), "cancelled-by-its-client")
        started = connection.read(Result(), until_final=False, max_responses=3)
        assert started.error is None and started.responses == 3
        wait_for_gauge(default_stack, "llm_engine_requests_running", 1)
    finally:
        connection.client.stop_stream(cancel_requests=True)  # the gRPC call cancelled, not half-closed
        connection.client.close()
    wait_for_gauge(default_stack, "llm_engine_requests_running", 0, timeout=5.0)
