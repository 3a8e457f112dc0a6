"""The ensemble over real gRPC (tritonclient) on a real tritonserver: a tiny random Gemma 3 + Gemma's tokenizer."""

from __future__ import annotations

import pytest

from tests.triton_calls import (
    Result,
    TritonStream,
    engine_inputs,
    ensemble_inputs,
    generate,
    stop_engine_request,
    wait_for_gauge,
)

PROMPTS = ["The capital of France is", "Ünïcödé, 日本語 and emoji 👋🏽:", "  leading spaces\nand newlines\t"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_equals_non_stream(tiny_stack, prompt):
    whole = generate(tiny_stack.grpc_url, prompt, 48, stream=False)
    streamed = generate(tiny_stack.grpc_url, prompt, 48, stream=True)
    assert whole.error is None and streamed.error is None
    assert streamed.responses > 1
    assert streamed.text == whole.text
    assert streamed.token_ids == whole.token_ids
    assert streamed.finish_reason == whole.finish_reason == "length"
    assert streamed.num_output_tokens == whole.num_output_tokens == 48
    # Split UTF-8 is held back until complete: no chunk carries a replacement character the text lacks.
    if "\ufffd" not in whole.text:
        assert not any("\ufffd" in chunk for chunk in streamed.chunks)


@pytest.mark.parametrize("log_probs", [False, True])
def test_streamed_responses_carry_only_what_they_need(tiny_stack, log_probs):
    # Every tensor is copied at each hop of each streamed token: reasons come on the last response only, log
    # probabilities only when asked for.
    result = generate(tiny_stack.grpc_url, PROMPTS[0], 8, stream=True, return_log_probs=log_probs)
    assert result.error is None and result.finish_reason == "length"
    *middle, last = [names for names in result.output_names if "text_output" in names]
    assert middle and not any(names & {"finish_reason", "stop_reason"} for names in middle)
    assert {"finish_reason", "stop_reason"} <= last
    log_prob_outputs = {"cum_log_probs", "output_log_probs", "top_logprob_ids", "top_logprob_values"}
    for names in [*middle, last]:
        assert (log_prob_outputs <= names) if log_probs else not (log_prob_outputs & names)


def test_text_matches_tokenizer_decode(tiny_stack):
    from tokenization.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tiny_stack.model_dir)
    result = generate(tiny_stack.grpc_url, PROMPTS[1], 64, stream=True)
    assert result.text == tokenizer.decode(result.token_ids)


def test_prompt_is_echoed_unless_excluded(tiny_stack):
    prompt = "Echo this prompt"
    echoed = generate(tiny_stack.grpc_url, prompt, 8, stream=False, exclude_input_in_output=False)
    plain = generate(tiny_stack.grpc_url, prompt, 8, stream=False)
    assert echoed.text == prompt + plain.text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_is_trimmed_and_stops_the_engine(tiny_stack, stream):
    full = generate(tiny_stack.grpc_url, PROMPTS[0], 64, stream=False)
    stop = full.text[len(full.text) // 3 : len(full.text) // 3 + 3]
    assert stop.strip(), "need a visible stop string"
    expected = full.text[: full.text.index(stop)]

    result = generate(tiny_stack.grpc_url, PROMPTS[0], 64, stream=stream, stop_words=[stop, "never-present-xyz"])
    assert result.error is None
    assert result.text == expected
    assert result.finish_reason == "stop" and result.stop_reason == stop
    if stream:
        assert result.num_output_tokens < 64, "the engine kept generating after the stop string"

    with_stop = generate(tiny_stack.grpc_url, PROMPTS[0], 64, stream=stream, stop_words=[stop],
                         include_stop_str_in_output=True)
    assert with_stop.text == expected + stop


def test_too_long_prompt_is_an_error_and_the_server_lives_on(tiny_stack):
    result = generate(tiny_stack.grpc_url, "word " * 400, 16, stream=True)
    assert result.error is not None
    assert "maximum context length is 256 tokens" in result.error
    assert "in the prompt" in result.error
    after = generate(tiny_stack.grpc_url, PROMPTS[0], 4, stream=False)
    assert after.error is None and after.num_output_tokens == 4


def test_sampling_with_seed_is_reproducible(tiny_stack):
    options = dict(temperature=1.0, top_p=0.95, seed=1234)
    first = generate(tiny_stack.grpc_url, PROMPTS[0], 24, stream=True, **options)
    second = generate(tiny_stack.grpc_url, PROMPTS[0], 24, stream=False, **options)
    other = generate(tiny_stack.grpc_url, PROMPTS[0], 24, stream=False, temperature=1.0, top_p=0.95, seed=99)
    assert first.token_ids == second.token_ids
    assert other.token_ids != first.token_ids


def test_logit_bias_reaches_the_engine(tiny_stack):
    forced = 9259  # "Hello"
    result = generate(tiny_stack.grpc_url, PROMPTS[0], 6, stream=True, logit_bias_ids=[forced],
                      logit_bias_values=[100.0])
    assert result.token_ids == [forced] * 6
    mismatched = generate(tiny_stack.grpc_url, PROMPTS[0], 6, stream=True, logit_bias_ids=[forced, 5],
                          logit_bias_values=[1.0])
    assert mismatched.error and "logit_bias_ids has 2 entries" in mismatched.error


def test_stop_request_cancels_through_the_ensemble(tiny_stack):
    connection = TritonStream(tiny_stack.grpc_url)
    try:
        connection.send("ensemble", ensemble_inputs(PROMPTS[0], 200, True, ignore_eos=True), "cancel-me-1")
        started = connection.read(Result(), until_final=False, max_responses=3)
        assert started.error is None
        wait_for_gauge(tiny_stack, "llm_engine_requests_running", 1)
        stop_engine_request(connection, "cancel-me-1")
        rest = Result()
        while True:  # the stop request's own reply and the cancelled stream's final response
            connection.read(rest)
            if rest.finish_reason or rest.error:
                break
        assert rest.finish_reason == "cancelled"
        assert rest.num_output_tokens < 200
        wait_for_gauge(tiny_stack, "llm_engine_requests_running", 0)
    finally:
        connection.close()


def test_a_client_of_the_engine_gets_the_outputs_it_names_or_all(tiny_stack):
    # The engine model builds only the outputs a request names (tests/test_pipeline.py), from Triton's list of them:
    # a client that names some (the adapter does, leaving out the echoes of its own inputs) gets those, and one that
    # names none gets them all.
    inputs = engine_inputs([2, 651, 6037, 529], 3)
    connection = TritonStream(tiny_stack.grpc_url)
    try:
        connection.send("tensorrt_llm", inputs, "named", outputs=["output_ids", "finish_reason"])
        named = connection.read(Result())
        connection.send("tensorrt_llm", inputs, "all")
        everything = connection.read(Result())
    finally:
        connection.close()
    assert named.error is None and everything.error is None
    named_tokens = [names for names in named.output_names if names]
    assert len(named_tokens) == 3 and all(names <= {"output_ids", "finish_reason"} for names in named_tokens)
    assert all("output_ids" in names for names in named_tokens) and "finish_reason" in named_tokens[-1]
    all_tokens = [names for names in everything.output_names if names]
    assert len(all_tokens) == 3
    expected = {"output_ids", "sequence_length", "num_input_tokens", "request_context"}
    assert all(expected <= names for names in all_tokens)
