"""The rest of the surface against the real stack: models, metrics, metadata, version, docs; error statuses and
bodies (400, 401, 404, 413); chat prompt options (continue, add_generation_prompt, name, chat_template_kwargs).

API keys and a custom chat template need a second adapter process (`python -m adapter`) configured with them,
in front of the same tritonserver as `tiny_stack`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from launcher.serve import REPO_ROOT, free_port, stop_process
from tokenization.chat_template import render_chat

USER = [{"role": "user", "content": "Name three French cities."}]
KEY_A, KEY_B = "sk-test-alpha-0123456789", "sk-test-bravo-9876543210"
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}{% if m.name %} name={{ m.name }}{% endif %}>{{ m.content }}\n{% endfor %}"
    "{% if greeting %}[{{ greeting }}]{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def error_of(reply: httpx.Response) -> dict:
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.fixture(scope="module")
def base(tiny_stack) -> str:
    return tiny_stack.openai_base_url


@pytest.fixture(scope="module")
def client(tiny_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_stack.openai_base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_stack):
    from tokenization.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_stack.model_dir)


# --- endpoints ----------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client, tiny_stack):
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_stack.model_name]
    card = client.models.retrieve(tiny_stack.model_name)
    assert card.id == tiny_stack.model_name and card.object == "model"
    assert card.model_extra["max_model_len"] == 256
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4o")
    assert error.value.body["code"] == "model_not_found"


def test_metadata_and_version(base, tiny_stack):
    metadata = httpx.get(f"{base}/metadata", timeout=10).json()
    assert metadata["modelInfo"][0]["shortName"] == tiny_stack.model_name
    assert metadata["modelInfo"][0]["maxModelLen"] == 256
    assert metadata["version"]
    version = httpx.get(f"{base}/version", timeout=10).json()
    assert set(version) == {"release", "api"} and version["release"] == metadata["version"]


def test_openapi_docs_render(tiny_stack):
    root = tiny_stack.openai_base_url.removesuffix("/v1")
    docs = httpx.get(f"{root}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text
    spec = httpx.get(f"{root}/openapi.json", timeout=10).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/metrics", "/v1/metadata",
                 "/v1/version", "/v1/health/ready"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert {"logit_bias", "n", "nvext"} <= set(schemas["ChatCompletionRequest"]["properties"])
    assert {"best_of", "echo", "suffix"} <= set(schemas["CompletionRequest"]["properties"])


def metric_values(base: str) -> dict[str, float]:
    reply = httpx.get(f"{base}/metrics", timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    values = {}
    for line in reply.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_requests_tokens_and_latency(base, client, tiny_stack):
    label = f'model_name="{tiny_stack.model_name}"'
    before = metric_values(base)
    reply = client.completions.create(model=tiny_stack.model_name, prompt="Hello there", max_tokens=5, n=2,
                                      extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model=tiny_stack.model_name, messages=USER, max_tokens=4, stream=True,
                                            extra_body={"ignore_eos": True})
    assert len(list(stream)) > 1
    after = metric_values(base)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta(f"prompt_tokens_total{{{label}}}") >= reply.usage.prompt_tokens + 1
    assert delta(f"prefix_cache_queries_total{{{label}}}") == delta(f"prompt_tokens_total{{{label}}}")
    hits = f"prefix_cache_hits_total{{{label}}}"
    again = client.completions.create(model=tiny_stack.model_name, prompt="Hello there", max_tokens=1)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == again.usage.prompt_tokens - 1  # the same prompt ran just before
    assert metric_values(base)[hits] - after.get(hits, 0.0) == cached
    assert delta(f"generation_tokens_total{{{label}}}") == 10 + 4
    assert delta(f'request_success_total{{finished_reason="length",{label}}}') == 3
    assert delta(f"e2e_request_latency_seconds_count{{{label}}}") == 3
    assert delta(f"time_to_first_token_seconds_count{{{label}}}") == 1  # the streamed one
    assert delta(f"time_per_output_token_seconds_count{{{label}}}") == 1
    assert f"num_requests_running{{{label}}}" in after and f"num_requests_waiting{{{label}}}" in after


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("chat/completions", {"messages": USER, "temperature": 3}, "temperature"),
        ("chat/completions", {"messages": USER, "n": 0}, "n"),
        ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"messages": USER, "nvext": {"repetition_penalty": 0}}, "nvext.repetition_penalty"),
        ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": [999999999]}, None),  # the engine's own check: still 400
    ],
)
def test_bad_requests_are_400_with_param(base, tiny_stack, path, body, param):
    reply = httpx.post(f"{base}/{path}", json={"model": tiny_stack.model_name, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = error_of(reply)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_unknown_model_and_route_are_404(base):
    reply = httpx.post(f"{base}/chat/completions", json={"model": "gpt-4o", "messages": USER}, timeout=10)
    assert reply.status_code == 404 and error_of(reply)["code"] == "model_not_found"
    assert httpx.get(f"{base}/nothing-here", timeout=10).status_code == 404
    assert error_of(httpx.get(f"{base}/nothing-here", timeout=10))["type"] == "not_found_error"


def test_body_over_the_limit_is_413(base, tiny_stack):
    big = {"model": tiny_stack.model_name, "prompt": "a" * (10 * 2**20 + 10)}
    reply = httpx.post(f"{base}/completions", json=big, timeout=60)
    assert reply.status_code == 413
    assert error_of(reply)["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(11):
            yield b"a" * 2**20
        yield b'"}'

    reply = httpx.post(f"{base}/completions", content=chunked(), headers={"content-type": "application/json"},
                       timeout=60)
    assert reply.status_code == 413 and error_of(reply)["type"] == "invalid_request_error"
    # Under the limit, the body still reaches the route.
    ok = httpx.post(f"{base}/completions", json={"model": tiny_stack.model_name, "prompt": "hi", "max_tokens": 1},
                    timeout=30)
    assert ok.status_code == 200


# --- chat prompt options (the real Gemma template) ----------------------------------------------------------


def chat_prompt_tokens(client, tiny_stack, **kwargs) -> int:
    reply = client.chat.completions.create(model=tiny_stack.model_name, max_tokens=1, **kwargs)
    return reply.usage.prompt_tokens


def expected_tokens(tokenizer, messages, **options) -> int:
    prompt = render_chat(tokenizer.chat_template, messages, bos_token="<bos>", eos_token="<eos>", **options)
    return len(tokenizer.encode(prompt, add_special_tokens=False))


def test_add_generation_prompt_false_opens_no_turn(client, tiny_stack, tokenizer):
    messages = USER + [{"role": "assistant", "content": "Paris, Lyon"}]
    with_turn = chat_prompt_tokens(client, tiny_stack, messages=messages)
    without = chat_prompt_tokens(client, tiny_stack, messages=messages, extra_body={"add_generation_prompt": False})
    assert with_turn == expected_tokens(tokenizer, messages, add_generation_prompt=True)
    assert without == expected_tokens(tokenizer, messages, add_generation_prompt=False) < with_turn


@pytest.mark.parametrize("how", ["message", "top_level"])
def test_continue_final_message_continues_it(client, tiny_stack, tokenizer, how):
    partial = "Paris, Lyon and"
    messages = USER + [{"role": "assistant", "content": partial}]
    if how == "message":
        messages[-1] = {**messages[-1], "continue": True}
        extra = {}
    else:
        extra = {"continue_final_message": True, "add_generation_prompt": False}
    reply = client.chat.completions.create(model=tiny_stack.model_name, messages=messages, max_tokens=8,
                                           temperature=0, extra_body=extra)
    prompt = render_chat(tokenizer.chat_template, USER + [{"role": "assistant", "content": partial}],
                         add_generation_prompt=False, continue_final_message=True, bos_token="<bos>",
                         eos_token="<eos>")
    assert prompt.endswith(partial)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert reply.usage.prompt_tokens == len(ids)
    # The same prompt through /v1/completions (as token ids) gives the same greedy continuation.
    completion = client.completions.create(model=tiny_stack.model_name, prompt=ids, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == completion.choices[0].text


def test_continue_with_add_generation_prompt_true_is_400(base, tiny_stack):
    messages = USER + [{"role": "assistant", "content": "Paris", "continue": True}]
    reply = httpx.post(f"{base}/chat/completions", timeout=30,
                       json={"model": tiny_stack.model_name, "messages": messages, "add_generation_prompt": True})
    assert reply.status_code == 400 and error_of(reply)["param"] == "add_generation_prompt"


# --- a second adapter: API keys, a custom chat template, a small body limit ---------------------------------


@pytest.fixture(scope="module")
def keyed(tiny_stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("keyed-adapter")
    (work / "keys.txt").write_text(f"# one key per line\n{KEY_B}\n")
    (work / "template.jinja").write_text(TEMPLATE)
    port = free_port()
    env = dict(os.environ)
    env.update(
        MODEL_DIR=str(tiny_stack.model_dir), TRITON_GRPC_URL=tiny_stack.grpc_url, NIM_SERVER_PORT=str(port),
        NIM_MAX_MODEL_LEN="256", TRITON_METRICS_PORT=str(tiny_stack.metrics_port), NIM_API_KEYS=f" {KEY_A} ,",
        NIM_API_KEYS_FILE=str(work / "keys.txt"), NIM_CHAT_TEMPLATE=str(work / "template.jinja"),
        NIM_MAX_REQUEST_BODY_BYTES="4096", NIM_LOG_LEVEL="DEBUG",
    )
    log_path = work / "adapter.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "adapter"], cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        yield base, log_path
    finally:
        stop_process(process)


def test_api_keys_are_required_on_v1(keyed, tiny_stack):
    base, _ = keyed
    body = {"model": tiny_stack.model_name, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY_A},
                    {"Authorization": f"Basic {KEY_A}"}, {"Authorization": f"Bearer {KEY_A}x"}):
        reply = httpx.post(f"{base}/completions", json=body, headers=headers, timeout=30)
        assert reply.status_code == 401, headers
        error = error_of(reply)
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert KEY_A not in reply.text
    for path in ("models", "metrics", "metadata", "version", f"models/{tiny_stack.model_name}"):
        assert httpx.get(f"{base}/{path}", timeout=10).status_code == 401, path
    for path in ("health/ready", "health/live"):
        assert httpx.get(f"{base}/{path}", timeout=10).status_code == 200, path


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_configured_keys_work_with_the_sdk(keyed, tiny_stack, key):
    base, _ = keyed
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
    assert client.completions.create(model=tiny_stack.model_name, prompt="Hi", max_tokens=2).usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [tiny_stack.model_name]
    with pytest.raises(openai.AuthenticationError) as error:
        openai.OpenAI(base_url=base, api_key="nope", max_retries=0).models.list()
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"


def test_keys_never_reach_the_log(keyed, tiny_stack):
    base, log_path = keyed
    httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=10)
    httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {KEY_B}-typo"}, timeout=10)
    text = log_path.read_text()
    assert "401" in text or "invalid API key" in text
    assert KEY_A not in text and KEY_B not in text


def test_small_body_limit_is_413_after_the_key_check(keyed, tiny_stack):
    base, _ = keyed
    body = {"model": tiny_stack.model_name, "prompt": "a" * 5000}
    unauthenticated = httpx.post(f"{base}/completions", json=body, timeout=30)
    assert unauthenticated.status_code == 401  # keys first: no body is read for a stranger
    reply = httpx.post(f"{base}/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30)
    assert reply.status_code == 413 and "4096 bytes" in error_of(reply)["message"]


def test_message_names_and_template_kwargs_reach_the_template(keyed, tiny_stack, tokenizer):
    base, _ = keyed
    client = openai.OpenAI(base_url=base, api_key=KEY_A, max_retries=0, timeout=60)

    def prompt_tokens(messages, **extra):
        reply = client.chat.completions.create(model=tiny_stack.model_name, messages=messages, max_tokens=1,
                                               extra_body=extra or None)
        return reply.usage.prompt_tokens

    def expected(messages, **kwargs):
        text = render_chat(TEMPLATE, messages, bos_token="<bos>", eos_token="<eos>", add_generation_prompt=True,
                           **kwargs)
        return len(tokenizer.encode(text, add_special_tokens=False))

    named = [{"role": "user", "content": "Hi", "name": "Alice_Smith"}]
    assert prompt_tokens(named) == expected(named) > prompt_tokens([{"role": "user", "content": "Hi"}])
    greeting = {"greeting": "Bonjour tout le monde"}
    plain = [{"role": "user", "content": "Hi"}]
    assert prompt_tokens(plain, chat_template_kwargs=greeting) == expected(plain, **greeting) > prompt_tokens(plain)
