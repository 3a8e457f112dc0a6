"""Streaming against the real stack: streamed equals non-streamed (n > 1 too), the SSE wire format as raw bytes
(curl), the usage chunk, the async client, a client that goes away mid-stream giving the engine its capacity
back, and one that falls behind getting what waited for it merged into fewer events."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections import defaultdict

import httpx
import openai
import pytest

from tests.triton_calls import engine_gauge

PROMPT = "The capital of France is"
USER = [{"role": "user", "content": "Name three French cities."}]


@pytest.fixture(scope="module")
def client(tiny_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_stack.openai_base_url, api_key="unused", max_retries=0, timeout=120)


def collect_completion_stream(stream):
    texts, finish, logprobs, usage, ids = defaultdict(str), {}, defaultdict(list), None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs is not None:
                logprobs[choice.index] += choice.logprobs.token_logprobs
            if choice.finish_reason is not None:
                assert choice.index not in finish, "one finish_reason per choice"
                finish[choice.index] = choice.finish_reason
    return dict(texts), finish, dict(logprobs), usage, ids


def collect_chat_stream(stream):
    texts, finish, roles, logprobs, usage, ids = defaultdict(str), {}, {}, defaultdict(list), None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            if choice.delta.role is not None:
                assert choice.index not in texts, "the role comes first"
                roles[choice.index] = choice.delta.role
            texts[choice.index] += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                logprobs[choice.index] += [e.logprob for e in choice.logprobs.content]
            if choice.finish_reason is not None:
                assert choice.index not in finish
                finish[choice.index] = choice.finish_reason
    return dict(texts), finish, roles, dict(logprobs), usage, ids


# n=8: eight engine requests run together, so the engine's auto stream_interval holds tokens every other step
@pytest.mark.parametrize("n", [1, 3, 8])
def test_completion_stream_equals_whole(client, tiny_stack, n):
    args = dict(model=tiny_stack.model_name, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=21, n=n, logprobs=1)
    whole = client.completions.create(**args)
    stream = client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    texts, finish, logprobs, usage, ids = collect_completion_stream(stream)
    assert len(ids) == 1
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    for c in whole.choices:
        assert logprobs[c.index] == pytest.approx(c.logprobs.token_logprobs, abs=1e-5)
    assert_same_usage_with_the_prompt_cached(usage, whole.usage)
    if n > 1:
        assert len(set(texts.values())) == n


@pytest.mark.parametrize("n", [1, 2])
def test_chat_stream_equals_whole(client, tiny_stack, n):
    args = dict(model=tiny_stack.model_name, messages=USER, max_tokens=20, temperature=1.0, seed=5, n=n,
                logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**args)
    stream = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    texts, finish, roles, logprobs, usage, ids = collect_chat_stream(stream)
    assert len(ids) == 1
    assert roles == {i: "assistant" for i in range(n)}
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    for c in whole.choices:
        assert logprobs[c.index] == pytest.approx([e.logprob for e in c.logprobs.content], abs=1e-5)
    assert_same_usage_with_the_prompt_cached(usage, whole.usage)


def assert_same_usage_with_the_prompt_cached(usage, whole_usage):
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole_usage.prompt_tokens, whole_usage.completion_tokens, whole_usage.total_tokens)
    # The same prompt ran just before: all of it but its last token came from the engine's KV cache.
    assert whole_usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_stream_without_include_usage_has_no_usage_chunk(client, tiny_stack):
    stream = client.chat.completions.create(model=tiny_stack.model_name, messages=USER, max_tokens=4, stream=True)
    chunks = list(stream)
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)


def test_stream_stops_on_stop_string_like_whole(client, tiny_stack):
    base = dict(model=tiny_stack.model_name, prompt=PROMPT, max_tokens=40, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**base).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    whole = client.completions.create(**base, stop=stop)
    texts, finish, _, _, _ = collect_completion_stream(client.completions.create(**base, stop=stop, stream=True))
    assert texts[0] == whole.choices[0].text == full[: full.index(stop)]
    assert finish[0] == "stop"


def curl_sse(url: str, body: dict) -> str:
    result = subprocess.run(
        ["curl", "-sN", "--max-time", "60", url, "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, check=True, timeout=90,
    )
    return result.stdout.decode("utf-8")


def parse_sse(raw: str) -> list[dict]:
    """Strict: `data: <compact JSON>` events separated by blank lines, no `event:` or comment lines, [DONE] last."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:3]
    payloads = [e[len("data: "):] for e in events]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    for payload in payloads[:-1]:
        assert json.dumps(json.loads(payload), separators=(",", ":"), ensure_ascii=False) == payload
    return [json.loads(p) for p in payloads[:-1]]


def test_raw_sse_framing_with_curl(tiny_stack):
    body = {"model": tiny_stack.model_name, "messages": USER, "max_tokens": 8, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = parse_sse(curl_sse(f"{tiny_stack.openai_base_url}/chat/completions", body))
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    firsts = {}
    finishes = defaultdict(int)
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        firsts.setdefault(choice["index"], choice["delta"])
        finishes[choice["index"]] += choice["finish_reason"] is not None
    assert firsts == {0: {"role": "assistant", "content": ""}, 1: {"role": "assistant", "content": ""}}
    assert dict(finishes) == {0: 1, 1: 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all("usage" not in c for c in chunks[:-1])

    completion = parse_sse(curl_sse(f"{tiny_stack.openai_base_url}/completions",
                                    {"model": tiny_stack.model_name, "prompt": PROMPT, "max_tokens": 5,
                                     "stream": True}))
    assert all(c["object"] == "text_completion" for c in completion)
    assert sum(c["choices"][0]["finish_reason"] is not None for c in completion) == 1


def test_errors_before_the_stream_are_statuses_not_events(tiny_stack):
    reply = httpx.post(f"{tiny_stack.openai_base_url}/completions", timeout=60,
                       json={"model": tiny_stack.model_name, "prompt": "word " * 300, "stream": True, "n": 2})
    assert reply.status_code == 400
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json()["error"]["param"] == "prompt"


async def test_async_client_interleaves_n_streams(tiny_stack):
    client = openai.AsyncOpenAI(base_url=tiny_stack.openai_base_url, api_key="unused", max_retries=0, timeout=120)
    async with client:
        args = dict(model=tiny_stack.model_name, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=9, n=3,
                    extra_body={"ignore_eos": True})
        stream = await client.completions.create(**args, stream=True)
        order, texts = [], defaultdict(str)
        async for chunk in stream:
            for choice in chunk.choices:
                order.append(choice.index)
                texts[choice.index] += choice.text
        whole, chat = await asyncio.gather(
            client.completions.create(**args),
            client.chat.completions.create(model=tiny_stack.model_name, messages=USER, max_tokens=4, n=2),
        )
    assert dict(texts) == {c.index: c.text for c in whole.choices}
    # Interleaved: choice 0 does not finish before the others start.
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)
    assert len(chat.choices) == 2


# --- a client that goes away --------------------------------------------------------------------------------


def adapter_gauge(stack, name: str) -> float:
    text = httpx.get(f"{stack.openai_base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not in /v1/metrics")


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_disconnect_mid_stream_frees_the_engine(tiny_stack, path):
    wait_for(lambda: engine_gauge(tiny_stack, "llm_engine_requests_running") == 0)
    body = {"model": tiny_stack.model_name, "max_tokens": 230, "n": 2, "stream": True, "ignore_eos": True}
    body.update({"messages": USER} if path == "chat/completions" else {"prompt": PROMPT})
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{tiny_stack.openai_base_url}/{path}", json=body) as reply:
            assert reply.status_code == 200
            lines = reply.iter_lines()
            for _ in range(6):
                next(lines)
            wait_for(lambda: engine_gauge(tiny_stack, "llm_engine_requests_running") == 2)
            assert adapter_gauge(tiny_stack, "num_requests_running") == 2
        # Leaving the block closes the connection mid-stream.
    started = time.monotonic()
    wait_for(lambda: engine_gauge(tiny_stack, "llm_engine_requests_running") == 0, timeout=10)
    assert time.monotonic() - started < 2.0, "the engine kept generating for the departed client"
    assert adapter_gauge(tiny_stack, "num_requests_running") == 0


def test_disconnect_during_a_whole_request_frees_the_engine(tiny_stack):
    wait_for(lambda: engine_gauge(tiny_stack, "llm_engine_requests_running") == 0)
    body = {"model": tiny_stack.model_name, "prompt": PROMPT, "max_tokens": 230, "n": 2, "ignore_eos": True}
    outcome = []

    def give_up_waiting():  # a read timeout: the client closes the connection before the answer
        with httpx.Client(timeout=httpx.Timeout(60, read=2.0)) as http:
            try:
                http.post(f"{tiny_stack.openai_base_url}/completions", json=body)
            except httpx.ReadTimeout as exc:
                outcome.append(exc)

    client = threading.Thread(target=give_up_waiting)
    client.start()
    wait_for(lambda: engine_gauge(tiny_stack, "llm_engine_requests_running") == 2)
    client.join()
    assert outcome, "the request finished before the client gave up"
    started = time.monotonic()
    wait_for(lambda: engine_gauge(tiny_stack, "llm_engine_requests_running") == 0, timeout=10)
    assert time.monotonic() - started < 2.0, "the engine kept generating for the departed client"



# --- a client that falls behind -----------------------------------------------------------------------------


async def stream_to_a_client_behind(app, path: str, body: dict, caught_up) -> tuple[int, str]:
    """POST `body` to the ASGI `app` as a client that stops reading at the first event after the roles until
    `caught_up()` returns: the app's writes wait meanwhile, as uvicorn's do once the socket and its write
    buffer are full (over loopback only after megabytes, so a real slow reader would need a huge answer)."""
    request: bytes | None = json.dumps(body).encode()
    answered = asyncio.Event()
    status, events, behind = 0, [], True

    async def receive() -> dict:
        nonlocal request
        if request is not None:
            message, request = {"type": "http.request", "body": request, "more_body": False}, None
            return message
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, behind
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message.get("body"):
            if behind and b'"role":' not in message["body"]:
                await caught_up()
                behind = False
            events.append(message["body"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    answered.set()
    return status, b"".join(events).decode("utf-8")


async def test_a_client_that_falls_behind_gets_fewer_events_and_the_same_answer(tiny_stack):
    """The adapter in this process over the stack's Triton, streaming to a client that reads nothing more from
    its first token until the engine has finished: the chunks that waited for it come merged into fewer events
    (NIM_SSE_COALESCE, on by default), with the text, logprobs and framing of any stream."""
    from adapter.app import create_app
    from adapter.settings import Settings

    async def running() -> float:
        return await asyncio.to_thread(engine_gauge, tiny_stack, "llm_engine_requests_running")

    async def engine_finished() -> None:  # the gauge is published every 0.2 s: see the request run, then end
        async with asyncio.timeout(120):
            while await running() == 0:
                await asyncio.sleep(0.05)
            while await running() != 0:
                await asyncio.sleep(0.1)

    body = {"model": tiny_stack.model_name, "messages": USER, "max_tokens": 200, "n": 2, "temperature": 1.0,
            "seed": 3, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    async with httpx.AsyncClient(timeout=120) as http:
        whole = (await http.post(f"{tiny_stack.openai_base_url}/chat/completions", json=body)).json()
    app = create_app(Settings(model_dir=tiny_stack.model_dir, triton_grpc_url=tiny_stack.grpc_url,
                              triton_metrics_port=tiny_stack.metrics_port))
    async with app.router.lifespan_context(app):
        while await running() != 0:  # the whole request's end, published
            await asyncio.sleep(0.1)
        status, raw = await stream_to_a_client_behind(
            app, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}},
            engine_finished)
    assert status == 200
    chunks = parse_sse(raw)
    roles, texts, logprobs, finishes, content_events = {}, defaultdict(str), defaultdict(list), defaultdict(int), 0
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        k, delta = choice["index"], choice["delta"]
        if "role" in delta:
            assert k not in roles and k not in texts, "the role comes first"
            roles[k] = delta["role"]
        texts[k] += delta.get("content") or ""
        logprobs[k] += (choice["logprobs"] or {}).get("content") or []
        finishes[k] += choice["finish_reason"] is not None
        content_events += bool(delta.get("content") or choice["logprobs"])
    assert roles == {0: "assistant", 1: "assistant"} and finishes == {0: 1, 1: 1}
    assert texts == {c["index"]: c["message"]["content"] for c in whole["choices"]}
    for c in whole["choices"]:
        assert [e["token"] for e in logprobs[c["index"]]] == [e["token"] for e in c["logprobs"]["content"]]
        assert [e["logprob"] for e in logprobs[c["index"]]] == pytest.approx(
            [e["logprob"] for e in c["logprobs"]["content"]], abs=1e-5)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 400
    assert content_events < 400, "every token had an event of its own"
