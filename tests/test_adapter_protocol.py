"""The adapter without Triton: request -> GenerationParams, validation errors, SSE framing, the error envelope.

A fake engine stands in for Triton, so every route runs for real in FastAPI.
"""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from pydantic_core import PydanticSerializationError

from adapter.app import create_app
from adapter.engine import EngineChunk, GenerationParams
from adapter.errors import (
    BadRequestError,
    EngineOverloadedError,
    EngineUnavailableError,
    openai_error,
    param_from_loc,
)
from adapter.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionStreamChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponseChoice,
    DeltaMessage,
)
from adapter.settings import Settings
from adapter.sse import _PLACEHOLDER, DONE, TextEvents, sse_event

MODEL = "test-model"
USER = [{"role": "user", "content": "Hi"}]


class FakeTokenizer:
    chat_template = "{{ messages }}"
    bos_token = "<bos>"
    eos_token = "<eos>"

    def encode(self, text, add_special_tokens=True):
        return list(range(len(text)))

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)

    def id_to_token_text(self, token_id):
        return f"t{token_id}"


def fake_render(template, messages, **kwargs):
    fake_render.calls.append((template, messages, kwargs))
    prompt = "".join(f"[{m['role']}]{m['content']}" for m in messages)
    return prompt + ("[assistant]" if kwargs["add_generation_prompt"] else "")


fake_render.calls = []


def chunks_hello() -> list[EngineChunk]:
    return [
        EngineChunk(text="Hel", token_ids=[1], log_probs=[-0.5], top_logprobs=[[(1, -0.5), (2, -1.5)]],
                    num_input_tokens=4, num_output_tokens=1),
        EngineChunk(text="lo", token_ids=[2], log_probs=[-0.25], top_logprobs=[[(2, -0.25), (3, float("-inf"))]],
                    num_input_tokens=4, num_output_tokens=2),
        EngineChunk(text="!", token_ids=[3], log_probs=[-1.0], top_logprobs=[[(3, -1.0), (1, -2.0)]],
                    num_input_tokens=4, num_output_tokens=3, finish_reason="stop", stop_reason="END"),
    ]


class FakeEngine:
    def __init__(self):
        self.chunks: list[EngineChunk] = chunks_hello()
        self.error: Exception | None = None
        self.error_after: int | None = None  # raise after this many chunks
        self.ready = True
        self.calls: list[tuple[str, object, GenerationParams]] = []

    async def generate(self, request_id, prompt, params):
        self.calls.append((request_id, prompt, params))
        if self.error is not None and self.error_after is None:
            raise self.error
        for i, chunk in enumerate(self.chunks):
            if self.error_after is not None and i == self.error_after:
                raise self.error
            yield chunk

    async def cancel(self, request_id):
        pass

    async def is_ready(self):
        return self.ready

    async def close(self):
        pass


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine):
    fake_render.calls.clear()
    app = create_app(Settings(served_model_name=MODEL, max_model_len=2048), engine=engine,
                     tokenizer=FakeTokenizer(), render=fake_render)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def sse_events(text: str) -> list:
    """Parse an SSE body strictly: only `data:` lines, each event ended by a blank line, [DONE] last."""
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


# --- request -> GenerationParams ----------------------------------------------------------------------------


def test_chat_maps_sampling_fields():
    request = ChatCompletionRequest(
        model=MODEL, messages=USER, max_tokens=10, max_completion_tokens=20, temperature=0.7, top_p=0.9,
        stop="###", seed=-1, presence_penalty=0.5, frequency_penalty=-0.5, top_k=40, min_p=0.05,
        repetition_penalty=1.1, min_tokens=2, ignore_eos=True, stop_token_ids=[7, 8], skip_special_tokens=False,
        include_stop_str_in_output=True, logprobs=True, top_logprobs=3, stream=True,
    )
    params = request.to_generation_params(add_special_tokens=False)
    assert params == GenerationParams(
        max_tokens=20, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, seed=-1, min_tokens=2, stop=("###",),
        stop_token_ids=(7, 8), ignore_eos=True, skip_special_tokens=False, include_stop_str_in_output=True,
        add_special_tokens=False, return_log_probs=True, top_logprobs=3, stream=True,
    )


def test_chat_defaults_are_openais():
    params = ChatCompletionRequest(messages=USER).to_generation_params()
    assert params.max_tokens is None  # as many as the context leaves
    # OpenAI samples at temperature 1 by default; the engine alone would decode greedily.
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.0, None, None, None)
    assert params.stop == () and not params.return_log_probs and params.stream is False


def test_temperature_zero_is_greedy_and_top_k_off_values_are_dropped():
    assert ChatCompletionRequest(messages=USER, temperature=0).to_generation_params().top_k == 1
    assert ChatCompletionRequest(messages=USER, temperature=0).to_generation_params().temperature is None
    assert ChatCompletionRequest(messages=USER, top_k=-1).to_generation_params().top_k is None
    assert ChatCompletionRequest(messages=USER, top_k=0).to_generation_params().top_k is None


def test_completion_maps_prompt_logprobs_and_default_max_tokens():
    request = CompletionRequest(prompt="Once", logprobs=2, stop=["a", "", "b"])
    params = request.to_generation_params(add_special_tokens=True)
    assert params.max_tokens == 16 and params.add_special_tokens is True
    assert (params.return_log_probs, params.top_logprobs) == (True, 2)
    assert params.stop == ("a", "b")
    assert request.prompt_inputs() == ["Once"]
    assert CompletionRequest(prompt=["x"]).prompt_inputs() == ["x"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompt_inputs() == [[1, 2, 3]]
    assert CompletionRequest(prompt=[[4, 5]]).prompt_inputs() == [[4, 5]]
    assert CompletionRequest(prompt=["a", "b"]).prompt_inputs() == ["a", "b"]  # a batch
    with pytest.raises(BadRequestError):
        CompletionRequest(prompt=["a", ""]).prompt_inputs()


def test_messages_become_template_messages():
    request = ChatCompletionRequest(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ])
    assert request.template_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]


# --- validation errors: 400 with param ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": USER, "n": 0}, "n", "greater than or equal to 1"),
        ({"messages": USER, "n": 129}, "n", "less than or equal to 128"),
        ({"messages": USER, "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        ({"messages": USER, "logit_bias": {"x": 1}}, "logit_bias.x", ""),
        ({"messages": USER, "top_k": 5, "nvext": {"top_k": 6}}, "nvext.top_k", "different values"),
        ({"messages": USER, "nvext": {"min_p": 2}}, "nvext.min_p", ""),
        ({"messages": [{"role": "user", "content": "x", "continue": True}]}, "messages[0].continue", ""),
        ({"messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True,
          "add_generation_prompt": True}, "add_generation_prompt", "cannot both be true"),
        ({"messages": USER, "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"messages": USER, "top_p": 0}, "top_p", "greater than 0"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": USER, "presence_penalty": 3}, "presence_penalty", ""),
        ({"messages": USER, "top_logprobs": 21, "logprobs": True}, "top_logprobs", ""),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs", "logprobs must be true"),
        ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({"messages": USER, "stop": 5}, "stop", ""),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", ""),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content", "only text content parts"),
        ({"messages": []}, "messages", ""),
        ({}, "messages", "Missing required parameter"),
    ],
)
def test_chat_validation_errors_are_400_with_param(client, engine, body, param, fragment):
    reply = client.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]
    assert not engine.calls  # nothing reached the engine


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
        ({"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": "x", "n": 0}, "n"),
        ({}, "prompt"),
    ],
)
def test_completion_validation_errors_are_400_with_param(client, engine, body, param):
    reply = client.post("/v1/completions", json={"model": MODEL, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert not engine.calls


def test_malformed_json_and_non_object_bodies_are_400(client):
    for content in (b"{not json", b"[1, 2]", b""):
        reply = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert reply.status_code == 400, (content, reply.text)
        assert reply.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_model_not_found(client, engine):
    for path, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "x"})):
        reply = client.post(path, json={"model": "gpt-4o", **body})
        assert reply.status_code == 404
        assert reply.json()["error"] == {
            "message": "The model `gpt-4o` does not exist.", "type": "invalid_request_error", "param": "model",
            "code": "model_not_found",
        }
    assert client.get("/v1/models/gpt-4o").status_code == 404
    assert not engine.calls


def test_unknown_fields_are_logged_not_rejected(client, engine, caplog):
    with caplog.at_level(logging.WARNING, logger="adapter.protocol"):
        reply = client.post("/v1/chat/completions",
                            json={"model": MODEL, "messages": USER, "nvext": {"guided_json": {}}, "frobnicate": True})
    assert reply.status_code == 200, reply.text
    assert "frobnicate" in caplog.text and "nvext.guided_json" in caplog.text


def test_param_from_loc():
    assert param_from_loc(("body", "messages", 0, "content", "list[dict[str,any]]", 1)) == "messages[0].content[1]"
    assert param_from_loc(("body", "temperature")) == "temperature"
    assert param_from_loc(("body",)) is None


# --- chat ---------------------------------------------------------------------------------------------------


def test_chat_completion_shape(client, engine):
    reply = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "system", "content": "S"}, *USER], "stop": ["END"], "max_tokens": 8,
    })
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > len("chatcmpl-") + 16
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert isinstance(body["created"], int) and body["system_fingerprint"].startswith("fp_")
    assert body["choices"] == [{
        "index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": None},
        "logprobs": None, "finish_reason": "stop", "stop_reason": "END",
    }]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    request_id, prompt, params = engine.calls[0]
    assert request_id == body["id"]
    assert prompt == "[system]S[user]Hi[assistant]"
    assert params.add_special_tokens is False and params.stream is False and params.max_tokens == 8
    template, _, kwargs = fake_render.calls[0]
    assert template == FakeTokenizer.chat_template
    assert kwargs["bos_token"] == "<bos>" and kwargs["eos_token"] == "<eos>"


def test_chat_logprobs_shape(client):
    reply = client.post("/v1/chat/completions",
                        json={"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 2})
    content = reply.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["t1", "t2", "t3"]
    assert content[0] == {
        "token": "t1", "logprob": -0.5, "bytes": [116, 49],
        "top_logprobs": [{"token": "t1", "logprob": -0.5, "bytes": [116, 49]},
                         {"token": "t2", "logprob": -1.5, "bytes": [116, 50]}],
    }
    assert content[1]["top_logprobs"][1]["logprob"] == -9999.0  # -inf is not JSON


def test_length_finish_reason_and_eos_stop_reason(client, engine):
    engine.chunks = [EngineChunk(text="abc", token_ids=[1, 2], num_input_tokens=1, num_output_tokens=2,
                                 finish_reason="length")]
    body = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2}).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["stop_reason"] is None
    # An end token that the client did not ask for (EOS) is not a stop_reason; one it asked for is, as an int.
    engine.chunks = [EngineChunk(text="a", token_ids=[9], num_output_tokens=1, finish_reason="stop", stop_reason="1")]
    body = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER}).json()
    assert body["choices"][0]["stop_reason"] is None
    body = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "stop_token_ids": [1]}).json()
    assert body["choices"][0]["stop_reason"] == 1
    # No finish reason from the engine: inferred from max_tokens.
    engine.chunks = [EngineChunk(text="a", token_ids=[9, 9], num_output_tokens=2)]
    body = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2}).json()
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_stream_framing(client, engine):
    with client.stream("POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": USER, "stream": True, "stream_options": {"include_usage": True},
    }) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = reply.read().decode()
    assert "event:" not in text and ": ping" not in text
    chunks = sse_events(text)
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], MODEL, "chat.completion.chunk")}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello!"
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"] is not None]
    assert finishes == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert all("usage" not in c for c in chunks[:-1])
    assert engine.calls[0][2].stream is True


def test_chat_stream_without_usage_and_with_logprobs(client):
    text = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": USER, "stream": True, "logprobs": True, "top_logprobs": 1}).text
    chunks = sse_events(text)
    assert all(c["choices"] for c in chunks)
    tokens = [lp["token"] for c in chunks for lp in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert tokens == ["t1", "t2", "t3"]


def test_chat_without_template_is_a_clear_400(engine):
    tokenizer = FakeTokenizer()
    tokenizer.chat_template = None
    app = create_app(Settings(served_model_name=MODEL), engine=engine, tokenizer=tokenizer, render=fake_render)
    with TestClient(app) as c:
        reply = c.post("/v1/chat/completions", json={"messages": USER})
    assert reply.status_code == 400 and "NIM_CHAT_TEMPLATE" in reply.json()["error"]["message"]


def test_server_chat_template_overrides_the_models(engine, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("OVERRIDE")
    app = create_app(Settings(served_model_name=MODEL, chat_template=path), engine=engine,
                     tokenizer=FakeTokenizer(), render=fake_render)
    fake_render.calls.clear()
    with TestClient(app) as c:
        assert c.post("/v1/chat/completions", json={"messages": USER}).status_code == 200
    assert fake_render.calls[0][0] == "OVERRIDE"


def test_template_errors_are_400(engine):
    def failing(*_, **__):
        raise ValueError("Conversation roles must alternate user/assistant")

    app = create_app(Settings(served_model_name=MODEL), engine=engine, tokenizer=FakeTokenizer(), render=failing)
    with TestClient(app) as c:
        reply = c.post("/v1/chat/completions", json={"messages": USER})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "Conversation roles must alternate user/assistant"


# --- completions --------------------------------------------------------------------------------------------


def test_completion_shape_echo_and_token_prompt(client, engine):
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "Say", "echo": True}).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "SayHello!", "logprobs": None, "finish_reason": "stop",
                                "stop_reason": None}]
    assert engine.calls[0][1] == "Say" and engine.calls[0][2].add_special_tokens is True
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6], "echo": True}).json()
    assert body["choices"][0]["text"] == "<5><6>Hello!"
    assert engine.calls[1][1] == [5, 6]


def test_completion_logprobs_shape(client):
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 1}).json()
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["t1", "t2", "t3"],
        "token_logprobs": [-0.5, -0.25, -1.0],
        "top_logprobs": [{"t1": -0.5}, {"t2": -0.25}, {"t3": -1.0}],
        "text_offset": [0, 2, 4],
    }


def test_completion_stream_framing(client):
    text = client.post("/v1/completions", json={
        "model": MODEL, "prompt": "Say", "stream": True, "echo": True,
        "stream_options": {"include_usage": True}, "logprobs": 0}).text
    # echo with logprobs is refused; without logprobs it streams the prompt first
    assert json.loads(text)["error"]["param"] == "echo"
    chunks = sse_events(client.post("/v1/completions", json={
        "model": MODEL, "prompt": "Say", "stream": True, "echo": True,
        "stream_options": {"include_usage": True}}).text)
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == "SayHello!"
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7


# --- engine errors and the error envelope -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (BadRequestError("This model's maximum context length is 256 tokens."), 400, None),
        (EngineOverloadedError(), 429, "1"),
        (EngineUnavailableError(), 503, "1"),
        (RuntimeError("secret internal detail"), 500, None),
    ],
)
def test_engine_errors_before_the_first_chunk_get_their_status(client, engine, error, status, retry_after, stream):
    engine.error = error
    reply = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "stream": stream})
    assert reply.status_code == status
    assert reply.headers.get("retry-after") == retry_after
    body = reply.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "secret" not in reply.text
    if status == 400:
        assert body["error"]["message"] == "This model's maximum context length is 256 tokens."


def test_error_mid_stream_is_an_error_event_then_done(client, engine):
    engine.error, engine.error_after = EngineUnavailableError(), 1
    text = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}).text
    events = sse_events(text)
    assert events[-1]["error"]["code"] == "service_unavailable"
    assert events[0]["choices"][0]["text"] == "Hel"


def test_openai_error_and_sse_event_format():
    assert openai_error(400, "bad", "invalid_request_error", "x") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}}
    assert sse_event({"a": "é", "b": [1, 2]}) == 'data: {"a":"é","b":[1,2]}\n\n'
    assert DONE == "data: [DONE]\n\n"


def chat_delta(model: str = MODEL):
    return lambda k, text: ChatCompletionChunk(id="chatcmpl-1", created=1, model=model, system_fingerprint="fp_1",
                                               choices=[ChatCompletionStreamChoice(index=k,
                                                                                   delta=DeltaMessage(content=text))])


def completion_text(k, text):
    return CompletionChunk(id="cmpl-1", created=1, model=MODEL, choices=[CompletionResponseChoice(index=k, text=text)])


# Every ASCII code point, then non-ASCII: Latin-1 (C1 controls, NBSP), accents, CJK, U+2028/2029, U+FFFD, emoji.
TEXTS = [chr(c) for c in range(0x80)] + [chr(c) for c in range(0x80, 0x800, 3)] + list("éÅñßü中文字한글") + [
    "\u2028", "\u2029", "\ufffd", "\ufeff", "\U0001f600", "\U0010ffff", "\ue000",
    'He said "hi" \\ \n\t\r\x00\x1f\x7f é\u2028中\U0001f600', " world", "", "</script>", "\\u0041",
]


@pytest.mark.parametrize("build", [chat_delta(), completion_text], ids=["chat", "completion"])
def test_text_events_are_pydantics_bytes(build):
    events = TextEvents(build)
    for k in (0, 1, 12):
        for text in TEXTS:
            assert events(k, text) == sse_event(build(k, text)), (k, text)
    assert all(events.templates.values())  # all went through the template, none through the fallback
    # A lone surrogate (no UTF-8 for it) is pydantic's to refuse, as it was.
    with pytest.raises(PydanticSerializationError, match="surrogates not allowed"):
        events(0, "a\ud800")


def test_text_events_fall_back_to_pydantic_when_the_placeholder_is_not_once_in_the_event():
    for model, templated in ((_PLACEHOLDER, False), (f'm"{_PLACEHOLDER}', False), (f"m{_PLACEHOLDER}", True)):
        build = chat_delta(model)
        events = TextEvents(build)
        assert events(0, 'a"é') == sse_event(build(0, 'a"é')) and (events.templates[0] is not None) == templated


@pytest.mark.parametrize(("path", "body", "model"), [
    ("/v1/chat/completions", {"messages": USER}, ChatCompletionChunk),
    ("/v1/completions", {"prompt": "x"}, CompletionChunk),
])
def test_n_streams_are_pydantics_events(client, engine, path, body, model):
    engine.chunks = [EngineChunk(text='Hé"\n', token_ids=[1], num_input_tokens=1, num_output_tokens=1),
                     EngineChunk(text="\u2028中", token_ids=[2], num_input_tokens=1, num_output_tokens=2,
                                 finish_reason="stop")]
    text = client.post(path, json={"model": MODEL, **body, "n": 2, "stream": True,
                                   "stream_options": {"include_usage": True}}).text
    events = text.split("\n\n")[:-2]
    assert len(events) >= 5 and all(e == sse_event(model.model_validate_json(e[len("data: "):]))[:-2] for e in events)
    texts = {0: "", 1: ""}
    for event in sse_events(text)[:-1]:
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "") if "delta" in choice else choice["text"]
    assert texts == {0: 'Hé"\n\u2028中', 1: 'Hé"\n\u2028中'}


def test_unknown_route_uses_the_envelope(client):
    reply = client.get("/v1/nothing")
    assert reply.status_code == 404 and "error" in reply.json()


# --- models and health --------------------------------------------------------------------------------------


def test_models_list(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "system"
    assert card["max_model_len"] == 2048 and isinstance(card["created"], int)
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_health(client, engine):
    assert client.get("/v1/health/live").json() == {"status": "live"}
    assert client.get("/v1/health/ready").json() == {"status": "ready"}
    engine.ready = False
    assert client.get("/v1/health/ready").status_code == 503


# --- settings -----------------------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch, tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 32768}}))
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    monkeypatch.setenv("NIM_SERVER_PORT", "9000")
    monkeypatch.setenv("NIM_JSONL_LOGGING", "1")
    monkeypatch.setenv("TRITON_GRPC_URL", "triton:8001")
    settings = Settings()
    assert settings.model_name == "my-model" and settings.server_port == 9000 and settings.jsonl_logging
    assert settings.triton_grpc_url == "triton:8001" and settings.triton_model_name == "ensemble"
    assert settings.triton_engine_model_name == "tensorrt_llm"
    assert settings.resolved_max_model_len() == 32768
    monkeypatch.setenv("NIM_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("NIM_SERVED_MODEL_NAME", "served")
    settings = Settings()
    assert settings.resolved_max_model_len() == 1024 and settings.model_name == "served"


def test_jsonl_logging_is_one_json_object_per_line(capsys):
    from adapter.logging_setup import configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("INFO", jsonl=True)
        logging.getLogger("adapter.test").info("hello\nworld", extra={"request_id": "r1"})
        line = capsys.readouterr().err.strip()
        assert "\n" not in line
        entry = json.loads(line)
        assert entry["message"] == "hello\nworld" and entry["request_id"] == "r1" and entry["level"] == "INFO"
        configure_logging("INFO", jsonl=False)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("adapter.test").exception("failed")
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# --- n, best_of, extras, keys, body limit (with the fake engine) --------------------------------------------


def test_fan_out_ids_and_seeds():
    from adapter.serving_base import fan_out

    params = GenerationParams(seed=10)
    (single,) = fan_out("r", ["p"], params, 1)
    assert single.request_id == "r" and single.params.seed == 10
    many = fan_out("r", ["a", "b"], params, 2)
    assert [(s.index, s.prompt_index, s.prompt, s.request_id, s.params.seed) for s in many] == [
        (0, 0, "a", "r-0", 10), (1, 0, "a", "r-1", 11), (2, 1, "b", "r-2", 10), (3, 1, "b", "r-3", 11)]
    assert all(s.params.seed is None for s in fan_out("r", ["a"], GenerationParams(), 3))


def test_extras_logit_bias_and_nvext_map_to_params():
    request = CompletionRequest(prompt="x", logit_bias={"7": -100, "3": 2.5},
                                nvext={"top_k": 4, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2,
                                       "ignore_eos": True, "stop_token_ids": [9], "skip_special_tokens": False,
                                       "include_stop_str_in_output": True})
    params = request.to_generation_params(vocab_size=10)
    assert params.logit_bias == ((3, 2.5), (7, -100.0))
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens, params.ignore_eos,
            params.stop_token_ids, params.skip_special_tokens, params.include_stop_str_in_output) == (
        4, 0.1, 1.2, 2, True, (9,), False, True)
    with pytest.raises(BadRequestError) as error:
        CompletionRequest(prompt="x", logit_bias={"10": 1}).to_generation_params(vocab_size=10)
    assert error.value.param == "logit_bias"


def test_best_of_asks_the_engine_for_log_probs():
    params = CompletionRequest(prompt="x", best_of=3).to_generation_params()
    assert params.return_log_probs and params.top_logprobs == 0
    assert CompletionRequest(prompt="x", best_of=3).num_sequences() == 3
    assert not CompletionRequest(prompt="x", n=2).to_generation_params().return_log_probs


def test_n_sends_n_engine_requests_and_best_of_ranks(client, engine):
    async def generate(request_id, prompt, params):
        engine.calls.append((request_id, prompt, params))
        cum = {0: -3.0, 1: -1.0, 2: -2.0}[int(request_id.rsplit("-", 1)[1])]
        yield EngineChunk(text=f"seq{params.seed}", token_ids=[1], num_input_tokens=2, num_output_tokens=1,
                          cum_log_prob=cum, finish_reason="length")

    engine.generate = generate
    reply = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "best_of": 3, "seed": 5})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "seq6"), (1, "seq7")]  # cum -1, then -2
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    ids = [call[0] for call in engine.calls]
    assert len(ids) == 3 and all(i.startswith(body["id"] + "-") for i in ids)


def test_chat_n_streams_every_index(client, engine):
    reply = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "n": 2, "stream": True,
                                                      "stream_options": {"include_usage": True}})
    events = sse_events(reply.text)
    by_index = {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        by_index.setdefault(choice["index"], []).append(choice)
    assert set(by_index) == {0, 1}
    for choices in by_index.values():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in choices) == "Hello!"
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["stop"]
    assert events[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_merge_joins_chunks_and_keeps_the_latest_counts_and_end():
    first, *rest = chunks_hello()
    merged = EngineChunk.merge(rest)
    assert merged == EngineChunk(text="lo!", token_ids=[2, 3], log_probs=[-0.25, -1.0],
                                 top_logprobs=[[(2, -0.25), (3, float("-inf"))], [(3, -1.0), (1, -2.0)]],
                                 num_input_tokens=4, num_output_tokens=3, finish_reason="stop", stop_reason="END")
    assert EngineChunk.merge([first]) is first
    assert EngineChunk.merge([]) == EngineChunk()
    without_logprobs = EngineChunk.merge([EngineChunk(text="a", token_ids=[1]), EngineChunk(text="b", token_ids=[2])])
    assert without_logprobs.log_probs is None and without_logprobs.top_logprobs is None


@pytest.mark.parametrize("coalesce", [True, False])
def test_chunks_waiting_for_the_client_go_out_as_one_event(engine, coalesce):
    # The fake engine yields without ever waiting, so all its chunks are queued before the first is sent: as for
    # a client that fell behind a fast engine.
    app = create_app(Settings(served_model_name=MODEL, sse_coalesce=coalesce), engine=engine,
                     tokenizer=FakeTokenizer(), render=fake_render)
    with TestClient(app) as c:
        events = sse_events(c.post("/v1/chat/completions", json={
            "model": MODEL, "messages": USER, "n": 2, "stream": True, "logprobs": True, "top_logprobs": 2,
            "stream_options": {"include_usage": True}}).text)
        whole = c.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "n": 2, "logprobs": True,
                                                      "top_logprobs": 2}).json()
    content = {0: [], 1: []}
    for event in events[:-1]:
        (choice,) = event["choices"]
        if choice["delta"].get("content"):
            content[choice["index"]].append(choice)
    for choice in whole["choices"]:
        deltas = content[choice["index"]]
        assert [d["delta"]["content"] for d in deltas] == (["Hello!"] if coalesce else ["Hel", "lo", "!"])
        assert [lp for d in deltas for lp in d["logprobs"]["content"]] == choice["logprobs"]["content"]
    assert events[-1]["usage"] == whole["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    assert Settings().sse_coalesce is True


def test_api_keys_and_body_limit_middleware(engine, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nkey-two\n\n")
    settings = Settings(served_model_name=MODEL, api_keys="key-one, ", api_keys_file=keys, max_request_body_bytes=300)
    assert settings.resolved_api_keys() == ("key-one", "key-two")
    app = create_app(settings, engine=engine, tokenizer=FakeTokenizer(), render=fake_render)
    with TestClient(app, raise_server_exceptions=False) as c:
        body = {"model": MODEL, "prompt": "x"}
        denied = c.post("/v1/completions", json=body)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert denied.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/health/live").status_code == 200
        assert c.get("/docs").status_code == 200
        for key in ("key-one", "key-two"):
            assert c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        big = c.post("/v1/completions", json={**body, "prompt": "x" * 400}, headers={"Authorization": "Bearer key-one"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_the_access_log_has_a_line_per_request_when_its_response_ends(engine, caplog):
    app = create_app(Settings(served_model_name=MODEL, api_keys="key-one"), engine=engine, tokenizer=FakeTokenizer(),
                     render=fake_render)
    key = {"Authorization": "Bearer key-one"}
    with TestClient(app) as c, caplog.at_level(logging.INFO, logger="adapter.access"):
        c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})  # no key: 401
        with c.stream("POST", "/v1/chat/completions?trace=1", headers=key,
                      json={"model": MODEL, "messages": USER, "stream": True}) as reply:
            for _ in reply.iter_lines():
                assert [r.getMessage() for r in caplog.records][1:] == [], "logged before the stream ended"
        c.post("/v1/completions", json={"model": "other", "prompt": "x"}, headers=key)
    records = [r for r in caplog.records if r.name == "adapter.access"]
    assert [(r.method, r.path, r.status) for r in records] == [
        ("POST", "/v1/completions", 401), ("POST", "/v1/chat/completions?trace=1", 200),
        ("POST", "/v1/completions", 404)]
    assert '"POST /v1/chat/completions?trace=1 HTTP/1.1" 200' in records[1].getMessage()
    assert all(r.duration_ms >= 0 for r in records)


def test_engine_gauges_parse_and_settings_urls(monkeypatch):
    from adapter.metrics import parse_engine_gauges

    text = ('# HELP llm_engine_requests_running x\nllm_engine_requests_running{model="tensorrt_llm",version="1"} 3\n'
            "llm_engine_requests_waiting 2\nnv_inference_count 9\n")
    assert parse_engine_gauges(text) == {"llm_engine_requests_running": 3.0, "llm_engine_requests_waiting": 2.0}
    monkeypatch.setenv("TRITON_METRICS_PORT", "9102")
    assert Settings().resolved_triton_metrics_url() == "http://127.0.0.1:9102/metrics"
    monkeypatch.setenv("TRITON_METRICS_URL", "http://triton:8002/metrics")
    assert Settings().resolved_triton_metrics_url() == "http://triton:8002/metrics"
    assert Settings().resolved_api_keys() == ()


def test_metadata_version_and_metrics_routes(client):
    assert client.get("/v1/metadata").json()["modelInfo"][0]["shortName"] == MODEL
    assert set(client.get("/v1/version").json()) == {"release", "api"}
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    text = client.get("/v1/metrics").text
    assert f'generation_tokens_total{{model_name="{MODEL}"}} 3.0' in text
    assert f'request_success_total{{finished_reason="stop",model_name="{MODEL}"}} 1.0' in text
