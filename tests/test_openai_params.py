"""Every sampling parameter of the OpenAI API (and vLLM's / NIM's extras) through the official `openai` client,
against the real stack (tritonserver + adapter, tiny random Gemma 3 with the real tokenizer). Each test fails
if its parameter is ignored."""

from __future__ import annotations

import math

import openai
import pytest

PROMPT = "The capital of France is"
USER = [{"role": "user", "content": "Name three French cities."}]
HELLO = 9259  # "Hello"
EOS = 1  # <eos>
START_OF_TURN = 105  # <start_of_turn>, a special token that is not an end token


@pytest.fixture(scope="module")
def client(tiny_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_stack.openai_base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(tiny_stack) -> str:
    return tiny_stack.model_name


@pytest.fixture(scope="module")
def tokenizer(tiny_stack):
    from tokenization.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_stack.model_dir)


def complete(client, model, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("max_tokens", 12)
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in _COMPLETION_ARGS}
    return client.completions.create(model=model, extra_body=extra or None, **kwargs)


def chat(client, model, **kwargs):
    kwargs.setdefault("messages", USER)
    kwargs.setdefault("max_tokens", 12)
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in _CHAT_ARGS}
    return client.chat.completions.create(model=model, extra_body=extra or None, **kwargs)


_COMPLETION_ARGS = {"prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
                    "frequency_penalty", "logit_bias", "logprobs", "echo", "best_of", "stream", "stream_options",
                    "user", "suffix"}
_CHAT_ARGS = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
              "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "stream",
              "stream_options", "user"}


def greedy_text(client, model, max_tokens=24, **kwargs) -> str:
    return complete(client, model, max_tokens=max_tokens, temperature=0, **kwargs).choices[0].text


# --- sampling -----------------------------------------------------------------------------------------------


def test_temperature_zero_is_deterministic_and_temperature_one_samples(client, model):
    assert greedy_text(client, model) == greedy_text(client, model)
    sampled = {complete(client, model, max_tokens=24, temperature=1.0).choices[0].text for _ in range(3)}
    assert len(sampled) > 1


def test_seed_reproduces_and_different_seeds_differ(client, model):
    first = complete(client, model, max_tokens=16, temperature=1.0, seed=1234).choices[0].text
    again = complete(client, model, max_tokens=16, temperature=1.0, seed=1234).choices[0].text
    other = complete(client, model, max_tokens=16, temperature=1.0, seed=4321).choices[0].text
    assert first == again
    assert other != first
    chat_a = chat(client, model, temperature=1.0, seed=7).choices[0].message.content
    chat_b = chat(client, model, temperature=1.0, seed=7).choices[0].message.content
    chat_c = chat(client, model, temperature=1.0, seed=8).choices[0].message.content
    assert chat_a == chat_b != chat_c


@pytest.mark.parametrize("extras", [{"top_k": 1}, {"nvext": {"top_k": 1}}, {"top_p": 1e-6}, {"min_p": 1.0},
                                    {"nvext": {"min_p": 1.0}}])
def test_narrowing_samplers_at_temperature_one_equal_greedy(client, model, extras):
    greedy = greedy_text(client, model)
    plain = {complete(client, model, max_tokens=24, temperature=1.0, seed=s).choices[0].text for s in (1, 2)}
    assert any(text != greedy for text in plain), "sampling without the parameter must differ from greedy"
    for seed in (1, 2):
        assert complete(client, model, max_tokens=24, temperature=1.0, seed=seed, **extras).choices[0].text == greedy


@pytest.mark.parametrize(
    "penalty",
    [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 2.0},
     {"nvext": {"repetition_penalty": 2.0}}],
)
def test_penalties_change_the_greedy_output(client, model, penalty):
    baseline = greedy_text(client, model, max_tokens=32)
    penalized = greedy_text(client, model, max_tokens=32, **penalty)
    assert penalized != baseline


def test_logit_bias_forces_and_bans_tokens(client, model, tokenizer):
    forced = complete(client, model, max_tokens=5, temperature=1.0, logit_bias={str(HELLO): 100})
    assert forced.choices[0].text == "Hello" * 5
    forced_chat = chat(client, model, max_tokens=3, logit_bias={str(HELLO): 100})
    assert forced_chat.choices[0].message.content == "Hello" * 3
    banned = greedy_text(client, model, max_tokens=5, logit_bias={str(HELLO): 100, "9": -100})
    assert banned == "Hello" * 5  # several entries
    greedy = complete(client, model, max_tokens=1, temperature=0, logprobs=0)
    first = greedy.choices[0].text
    assert first
    # Banning every token of the greedy first token's text changes it (the random model has no ties).
    without = complete(client, model, max_tokens=1, temperature=0,
                       logit_bias={str(t): -100 for t in tokenizer.encode(first, add_special_tokens=False)})
    assert without.choices[0].text != first


@pytest.mark.parametrize("bias", [{"262144": 1}, {"-1": 1}, {"5": 100.5}, {"5": -101}, {"x": 1}])
def test_bad_logit_bias_is_400_with_param(client, model, bias):
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, model, logit_bias=bias)
    assert error.value.status_code == 400
    assert error.value.body["param"].startswith("logit_bias")


# --- length and stopping ------------------------------------------------------------------------------------


def test_max_tokens_ends_with_length(client, model):
    reply = complete(client, model, max_tokens=7, temperature=1.0, ignore_eos=True)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    chat_reply = chat(client, model, max_completion_tokens=5, ignore_eos=True)
    assert chat_reply.choices[0].finish_reason == "length" and chat_reply.usage.completion_tokens == 5


@pytest.mark.parametrize("where", ["top", "nvext"])
def test_stop_trims_and_include_stop_str_in_output_keeps(client, model, where):
    full = greedy_text(client, model, max_tokens=48, ignore_eos=True)
    stop = full[len(full) // 3: len(full) // 3 + 3]
    assert stop.strip()
    expected = full[: full.index(stop)]
    trimmed = complete(client, model, max_tokens=48, temperature=0, ignore_eos=True, stop=[stop, "never-xyz"])
    assert trimmed.choices[0].text == expected
    assert trimmed.choices[0].finish_reason == "stop"
    assert trimmed.choices[0].model_extra["stop_reason"] == stop
    assert trimmed.usage.completion_tokens < 48, "a non-streamed request kept the engine busy after its stop"
    include = {"include_stop_str_in_output": True}
    kept = complete(client, model, max_tokens=48, temperature=0, ignore_eos=True, stop=stop,
                    **(include if where == "top" else {"nvext": include}))
    assert kept.choices[0].text == expected + stop


@pytest.mark.parametrize("where", ["top", "nvext"])
def test_min_tokens_holds_back_a_forced_eos(client, model, where):
    eos_now = complete(client, model, max_tokens=10, temperature=1.0, logit_bias={str(EOS): 100})
    assert eos_now.choices[0].finish_reason == "stop" and eos_now.usage.completion_tokens <= 1
    extra = {"min_tokens": 4}
    held = complete(client, model, max_tokens=10, temperature=1.0, logit_bias={str(EOS): 100},
                    **(extra if where == "top" else {"nvext": extra}))
    assert held.choices[0].finish_reason == "stop"
    assert 4 <= held.usage.completion_tokens <= 5
    assert held.choices[0].text


@pytest.mark.parametrize("where", ["top", "nvext"])
def test_ignore_eos_generates_past_a_forced_eos(client, model, where):
    extra = {"ignore_eos": True}
    reply = complete(client, model, max_tokens=6, temperature=1.0, logit_bias={str(EOS): 100},
                     **(extra if where == "top" else {"nvext": extra}))
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6


@pytest.mark.parametrize("where", ["top", "nvext"])
def test_stop_token_ids_end_the_completion(client, model, where):
    free = complete(client, model, max_tokens=6, temperature=1.0, logit_bias={str(HELLO): 100})
    assert free.choices[0].finish_reason == "length"
    extra = {"stop_token_ids": [HELLO]}
    stopped = complete(client, model, max_tokens=6, temperature=1.0, logit_bias={str(HELLO): 100},
                       **(extra if where == "top" else {"nvext": extra}))
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == HELLO  # vLLM's: the token id
    assert stopped.usage.completion_tokens == 1


@pytest.mark.parametrize("where", ["top", "nvext"])
def test_skip_special_tokens_false_shows_special_tokens(client, model, where):
    forced = {"logit_bias": {str(START_OF_TURN): 100}}
    skipped = complete(client, model, max_tokens=3, temperature=1.0, **forced)
    assert skipped.choices[0].text == ""
    extra = {"skip_special_tokens": False}
    shown = complete(client, model, max_tokens=3, temperature=1.0, **forced,
                     **(extra if where == "top" else {"nvext": extra}))
    assert shown.choices[0].text == "<start_of_turn>" * 3


def test_nvext_and_top_level_must_agree(client, model):
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, model, top_k=5, nvext={"top_k": 6})
    assert error.value.body["param"] == "nvext.top_k"
    same = complete(client, model, temperature=1.0, seed=3, top_k=1, nvext={"top_k": 1})
    assert same.choices[0].text == greedy_text(client, model, max_tokens=12)


# --- logprobs -----------------------------------------------------------------------------------------------


def test_chat_logprobs_and_top_logprobs(client, model):
    reply = chat(client, model, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and math.isfinite(entry.logprob)
        assert len(entry.top_logprobs) == 3
        assert all(alt.logprob <= 0 for alt in entry.top_logprobs)
        assert [a.logprob for a in entry.top_logprobs] == sorted((a.logprob for a in entry.top_logprobs),
                                                                 reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
    no_logprobs = chat(client, model, max_tokens=3)
    assert no_logprobs.choices[0].logprobs is None


def test_completion_logprobs_shape(client, model):
    reply = complete(client, model, max_tokens=5, temperature=1.0, seed=5, logprobs=2, ignore_eos=True)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert len(logprobs.text_offset) == 5 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(v <= 0 for v in logprobs.token_logprobs)
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs):
        assert 2 <= len(top) <= 3 and token in top  # the two best, plus the sampled one (vLLM)
        assert all(v <= 0 for v in top.values())


# --- KV cache reuse -----------------------------------------------------------------------------------------


def test_a_chats_next_turn_reports_its_history_as_cached_prompt_tokens(client, model):
    first = chat(client, model, max_tokens=6, temperature=0)
    history = USER + [{"role": "assistant", "content": first.choices[0].message.content}]
    second = chat(client, model, messages=history + [{"role": "user", "content": "And in Spain?"}], max_tokens=6,
                  temperature=0)
    # The first turn's prompt is the start of the second's; its last token ("\n" after the model's turn marker)
    # may merge with what the answer starts with.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


# --- n and best_of ------------------------------------------------------------------------------------------


def test_n_gives_n_different_choices_and_sums_usage(client, model):
    reply = complete(client, model, max_tokens=10, temperature=1.0, n=3, ignore_eos=True)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.text for c in reply.choices}) == 3
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 30
    assert reply.usage.prompt_tokens == complete(client, model, max_tokens=1).usage.prompt_tokens  # counted once
    chat_reply = chat(client, model, max_tokens=8, temperature=1.0, n=3)
    assert [c.index for c in chat_reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat_reply.choices}) == 3


def test_n_with_seed_is_seed_plus_index(client, model):
    reply = complete(client, model, max_tokens=10, temperature=1.0, n=3, seed=40)
    singles = [complete(client, model, max_tokens=10, temperature=1.0, seed=40 + i).choices[0].text for i in range(3)]
    assert [c.text for c in reply.choices] == singles
    again = complete(client, model, max_tokens=10, temperature=1.0, n=3, seed=40)
    assert [c.text for c in again.choices] == singles


def test_best_of_returns_the_highest_cumulative_logprob(client, model):
    seed, best_of = 11, 4
    candidates = []
    for i in range(best_of):
        one = complete(client, model, max_tokens=6, temperature=1.0, seed=seed + i, logprobs=0, ignore_eos=True)
        candidates.append((sum(one.choices[0].logprobs.token_logprobs), one.choices[0].text))
    ranked = [text for _, text in sorted(candidates, reverse=True)]
    assert len(set(ranked)) == best_of, "the candidates must differ for this test to mean anything"

    best = complete(client, model, max_tokens=6, temperature=1.0, seed=seed, best_of=best_of, ignore_eos=True)
    assert [c.text for c in best.choices] == ranked[:1]
    assert best.choices[0].logprobs is None  # ranking needs log probs; the client did not ask for them
    assert best.usage.completion_tokens == 6 * best_of  # every sampled sequence, as OpenAI bills best_of
    two = complete(client, model, max_tokens=6, temperature=1.0, seed=seed, best_of=best_of, n=2, ignore_eos=True)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.text for c in two.choices] == ranked[:2]


def test_best_of_errors(client, model):
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, model, best_of=2, stream=True)
    assert error.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, model, best_of=2, n=3)
    assert error.value.body["param"] == "best_of"


# --- completions specifics ----------------------------------------------------------------------------------


def test_echo_prepends_the_prompt(client, model, tokenizer):
    plain = greedy_text(client, model, max_tokens=6)
    echoed = complete(client, model, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    by_ids = complete(client, model, prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert by_ids.choices[0].text.startswith(PROMPT)


def test_batched_prompts_give_a_choice_each(client, model):
    prompts = [PROMPT, "Once upon a time"]
    reply = complete(client, model, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    singles = [greedy_text(client, model, max_tokens=6, prompt=p) for p in prompts]
    assert [c.text for c in reply.choices] == [singles[0], singles[0], singles[1], singles[1]]


def test_suffix_is_a_clear_400(client, model):
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, model, suffix="and so on")
    assert error.value.body["param"] == "suffix"
    assert "suffix is not supported" in error.value.body["message"]


def test_too_long_prompt_is_400_naming_the_prompt(client, model):
    with pytest.raises(openai.BadRequestError) as error:
        complete(client, model, prompt="word " * 300)
    body = error.value.body
    assert body["param"] == "prompt" and body["code"] == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, model, messages=[{"role": "user", "content": "word " * 300}], n=2)
    assert error.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, model, max_tokens=400, stream=True)
    assert error.value.body["param"] == "messages"
