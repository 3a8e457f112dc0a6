"""TritonEngine against an in-process fake of Triton's gRPC service: tensors sent, responses parsed, errors
typed, and a request abandoned mid-way stopped in the engine model (`stop = true`, same request id).

Then the whole adapter (uvicorn + TritonEngine) with the openai SDK against the same fake.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

import grpc
import numpy as np
import pytest
import pytest_asyncio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, serialize_byte_tensor, triton_to_np_dtype

from adapter.engine import GenerationParams
from adapter.errors import (
    BadRequestError,
    ContextLengthError,
    EngineInternalError,
    EngineOverloadedError,
    EngineUnavailableError,
)
from adapter.triton_engine import (
    TritonEngine,
    clean_message,
    ensemble_inputs,
    error_from_message,
    infer_request,
    output_arrays,
    parse_outputs,
    streamed_token_ids,
)
from launcher.serve import free_port


def request_tensors(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    tensors = {}
    for tensor, raw in zip(request.inputs, request.raw_input_contents):
        if tensor.datatype == "BYTES":
            array = deserialize_bytes_tensor(raw)
        else:
            array = np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype))
        tensors[tensor.name] = array.reshape(tuple(tensor.shape))
    return tensors


def infer_response(request_id: str, outputs: dict[str, np.ndarray], final: bool) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name="ensemble", id=request_id)
    for name, array in outputs.items():
        tensor = response.outputs.add()
        tensor.name, tensor.datatype = name, np_to_triton_dtype(array.dtype)
        tensor.shape.extend(array.shape)
        raw = serialize_byte_tensor(array).item() if array.dtype == np.object_ else array.tobytes()
        response.raw_output_contents.append(raw)
    response.parameters["triton_final_response"].bool_param = final
    return response


def step_outputs(text: str, token_ids: list[int], n_out: int, finish: str = "", stop: str = "") -> dict:
    n = len(token_ids)
    return {
        "text_output": np.array([[text.encode()]], dtype=np.object_),
        "output_token_ids": np.array([token_ids], dtype=np.int32),
        "output_log_probs": np.array([[[-0.5] * n]], dtype=np.float32),
        "cum_log_probs": np.array([[-0.5 * n_out]], dtype=np.float32),
        "top_logprob_ids": np.array([[[t, -1] for t in token_ids]], dtype=np.int32).reshape(1, n, 2),
        "top_logprob_values": np.array([[[-0.5, -np.inf] for _ in token_ids]], dtype=np.float32).reshape(1, n, 2),
        "finish_reason": np.array([[finish.encode()]], dtype=np.object_),
        "stop_reason": np.array([[stop.encode()]], dtype=np.object_),
        "num_input_tokens": np.array([[5]], dtype=np.int32),
        "num_output_tokens": np.array([[n_out]], dtype=np.int32),
    }


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Streams "Hello world" one word per response (or errors); answers stop requests to tensorrt_llm."""

    def __init__(self):
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.stop_requests: list[service_pb2.ModelInferRequest] = []
        self.stopped = asyncio.Event()
        self.error: str | None = None
        self.delay_s = 0.0
        self.steps = 2
        self.completed: list[str] = []  # requests whose stream reached its final response (not cancelled before)
        self.request_completed = asyncio.Event()
        self.calls = 0  # ModelStreamInfer calls opened
        self.abort = False  # end the call with UNAVAILABLE at its next request, as a Triton going away would

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name == "ensemble")

    async def ModelStreamInfer(self, request_iterator, context):
        self.calls += 1
        async for request in request_iterator:
            if self.abort:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is going away")
            if request.model_name == "tensorrt_llm":  # like the engine: the stopped request ends at its next step
                self.stop_requests.append(request)
                self.stopped.set()
                yield service_pb2.ModelStreamInferResponse(infer_response=infer_response(request.id, {}, True))
                continue
            self.requests.append(request)
            if self.error:  # Triton names the request in an error response too
                yield service_pb2.ModelStreamInferResponse(error_message=self.error,
                                                           infer_response=service_pb2.ModelInferResponse(id=request.id))
                continue
            for step in range(self.steps):
                await asyncio.sleep(self.delay_s)
                stopped = any(stop.id == request.id for stop in self.stop_requests)
                last = step == self.steps - 1 or stopped
                outputs = step_outputs(" world" if step else "Hello", [100 + step], step + 1,
                                       ("cancelled" if stopped else "length") if last else "")
                response = infer_response(request.id, outputs, False)
                yield service_pb2.ModelStreamInferResponse(infer_response=response)
                if last:
                    break
            self.completed.append(request.id)
            self.request_completed.set()
            yield service_pb2.ModelStreamInferResponse(infer_response=infer_response(request.id, {}, True))


@pytest_asyncio.fixture(loop_scope="function")
async def fake_triton():
    servicer = FakeTriton()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.url = f"127.0.0.1:{port}"
    yield servicer
    await server.stop(grace=None)


@pytest_asyncio.fixture(loop_scope="function")
async def engine(fake_triton):
    engine = TritonEngine(fake_triton.url, cancel_timeout_s=5)
    yield engine
    await engine.close()


# --- tensors ------------------------------------------------------------------------------------------------


def test_ensemble_inputs_for_a_text_prompt():
    params = GenerationParams(max_tokens=7, temperature=0.5, top_k=3, seed=-1, stop=("a", "bc"), stop_token_ids=(1, 2),
                              add_special_tokens=False, return_log_probs=True, top_logprobs=2, stream=True)
    tensors = ensemble_inputs("Hi é", params)
    described = {name: (np_to_triton_dtype(a.dtype), a.shape) for name, a in tensors.items()}
    assert described == {
        "text_input": ("BYTES", (1, 1)), "max_tokens": ("INT32", (1, 1)), "stream": ("BOOL", (1, 1)),
        "exclude_input_in_output": ("BOOL", (1, 1)), "temperature": ("FP32", (1, 1)), "top_k": ("INT32", (1, 1)),
        "add_special_tokens": ("BOOL", (1, 1)), "seed": ("UINT64", (1, 1)), "stop_words": ("BYTES", (1, 2)),
        "stop_token_ids": ("INT32", (1, 2)), "return_log_probs": ("BOOL", (1, 1)), "top_logprobs": ("INT32", (1, 1)),
    }
    assert tensors["text_input"][0, 0] == "Hi é".encode()
    assert tensors["seed"][0, 0] == 2**64 - 1
    assert tensors["max_tokens"][0, 0] == 7 and tensors["add_special_tokens"][0, 0] == np.False_


def test_ensemble_inputs_carry_logit_bias():
    tensors = ensemble_inputs("x", GenerationParams(logit_bias=((3, 2.5), (7, -100.0))))
    assert tensors["logit_bias_ids"].dtype == np.int32 and tensors["logit_bias_ids"].tolist() == [[3, 7]]
    assert tensors["logit_bias_values"].dtype == np.float32 and tensors["logit_bias_values"].tolist() == [[2.5, -100.0]]
    assert "logit_bias_ids" not in ensemble_inputs("x", GenerationParams())


def test_ensemble_inputs_for_token_ids_and_defaults():
    tensors = ensemble_inputs([5, 6, 7], GenerationParams())
    assert tensors["input_token_ids"].tolist() == [[5, 6, 7]] and tensors["input_token_ids"].dtype == np.int32
    assert tensors["text_input"].tolist() == [[b""]]
    assert tensors["max_tokens"].tolist() == [[0]]  # "as many as the context leaves"
    assert set(tensors) == {"text_input", "input_token_ids", "max_tokens", "stream", "exclude_input_in_output"}


def test_infer_request_round_trips_and_asks_for_the_empty_final_response():
    tensors = ensemble_inputs("x", GenerationParams(max_tokens=3, stop=("s",), top_p=0.5))
    request = infer_request("ensemble", "req-1", tensors)
    assert request.model_name == "ensemble" and request.id == "req-1"
    assert request.parameters["triton_enable_empty_final_response"].bool_param
    decoded = request_tensors(request)
    assert decoded["text_input"].tolist() == [[b"x"]] and decoded["stop_words"].tolist() == [[b"s"]]
    assert decoded["top_p"].dtype == np.float32 and decoded["max_tokens"].tolist() == [[3]]


def test_streamed_token_ids_read_only_a_response_of_tokens_and_their_count():
    def read(**outputs):
        return streamed_token_ids(infer_response("r", outputs, False), "output_ids", "sequence_length")

    ids, length = np.array([[[5, 6, -1]]], dtype=np.int32), np.array([[2]], dtype=np.int32)
    assert read(output_ids=ids, sequence_length=length) == [5, 6]
    assert read(sequence_length=length, output_ids=ids) == [5, 6]  # in any order
    assert read(output_ids=ids[:, :, :0], sequence_length=np.array([[0]], dtype=np.int32)) == []
    # Anything else goes the general way (None): the last response, other names, other types.
    assert read(output_ids=ids, sequence_length=length, finish_reason=np.array([[b"length"]], dtype=np.object_)) is None
    assert read(output_ids=ids) is None
    assert read(output_ids=ids, other=length) is None
    assert read(output_ids=ids.astype(np.int64), sequence_length=length) is None


def test_parse_outputs():
    outputs = step_outputs("Hi", [7, 8], 2, "stop", "###")
    chunk = parse_outputs(output_arrays(infer_response("r", outputs, False)))
    assert (chunk.text, chunk.token_ids, chunk.finish_reason, chunk.stop_reason) == ("Hi", [7, 8], "stop", "###")
    assert chunk.log_probs == [-0.5, -0.5] and chunk.top_logprobs == [[(7, -0.5)], [(8, -0.5)]]
    assert (chunk.num_input_tokens, chunk.num_output_tokens, chunk.cum_log_prob) == (5, 2, -1.0)
    empty = parse_outputs(output_arrays(infer_response("r", step_outputs("", [], 2), False)))
    assert empty.text == "" and empty.token_ids == [] and empty.finish_reason is None and empty.log_probs is None


@pytest.mark.parametrize(
    ("message", "kind", "cleaned"),
    [
        ("in ensemble 'ensemble', [request id: cmpl-1] Failed to process the request(s) for model instance "
         "'preprocessing_0_0', message: InvalidRequest: This model's maximum context length is 256 tokens.",
         ContextLengthError, "This model's maximum context length is 256 tokens."),
        ("[request id: x] unexpected inference input 'foo' for model 'ensemble'", BadRequestError, None),
        ("in ensemble 'ensemble', the prompt is empty", BadRequestError, "the prompt is empty"),
        ("Exceeds maximum queue size", EngineOverloadedError, None),
        ("Request for unknown model: 'ensemble' is not found", EngineUnavailableError, None),
        ("in ensemble 'ensemble', [request id: c] Server is stopping, scheduler for model has stopped accepting new "
         "inference requests", EngineUnavailableError, None),
        ("Failed to process the request(s) for model instance 'x', message: KeyError: 'y'", EngineInternalError,
         None),
    ],
)
def test_error_messages_become_typed_errors(message, kind, cleaned):
    error = error_from_message(message)
    assert type(error) is kind
    if cleaned is not None:
        assert error.message == cleaned
    if kind is EngineInternalError:
        assert "KeyError" not in error.message
    assert clean_message("plain") == "plain"


# --- streaming, errors and cancellation against the fake ----------------------------------------------------


async def test_generate_streams_to_the_final_response(engine, fake_triton):
    chunks = [c async for c in engine.generate("req-1", "Hi", GenerationParams(max_tokens=2, stream=True))]
    assert [c.text for c in chunks] == ["Hello", " world"]
    assert chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 2
    (request,) = fake_triton.requests
    assert request.id == "req-1" and request.model_name == "ensemble"
    assert request_tensors(request)["stream"].tolist() == [[True]]
    await asyncio.sleep(0.1)
    assert not fake_triton.stop_requests  # a finished request is not stopped


async def test_requests_share_one_stream_and_a_broken_one_is_replaced(engine, fake_triton):
    for k in range(3):
        chunks = [c async for c in engine.generate(f"req-{k}", "Hi", GenerationParams(max_tokens=2))]
        assert [c.text for c in chunks] == ["Hello", " world"]
    assert fake_triton.calls == 1
    fake_triton.abort = True
    with pytest.raises(EngineUnavailableError):
        async for _ in engine.generate("req-broken", "Hi", GenerationParams()):
            pass
    fake_triton.abort = False
    chunks = [c async for c in engine.generate("req-after", "Hi", GenerationParams(max_tokens=2))]
    assert [c.text for c in chunks] == ["Hello", " world"]
    assert fake_triton.calls == 2


async def test_in_stream_errors_are_typed(engine, fake_triton):
    fake_triton.error = "in ensemble 'ensemble', This model's maximum context length is 8 tokens."
    with pytest.raises(BadRequestError, match="maximum context length is 8"):
        async for _ in engine.generate("req-2", "Hi", GenerationParams()):
            pass
    fake_triton.error = "Exceeds maximum queue size"
    with pytest.raises(EngineOverloadedError):
        async for _ in engine.generate("req-3", "Hi", GenerationParams()):
            pass
    await asyncio.sleep(0.1)
    assert not fake_triton.stop_requests


async def test_closing_the_generator_early_stops_the_engine_request(engine, fake_triton):
    fake_triton.steps, fake_triton.delay_s = 50, 0.05
    async with aclosing(engine.generate("req-cancel", "Hi", GenerationParams())) as stream:
        first = await anext(stream)
        assert first.text == "Hello"
    await asyncio.wait_for(fake_triton.stopped.wait(), 5)
    (stop,) = fake_triton.stop_requests
    assert stop.model_name == "tensorrt_llm" and stop.id == "req-cancel"
    assert {k: v.tolist() for k, v in request_tensors(stop).items()} == {
        "input_ids": [[0]], "input_lengths": [[1]], "request_output_len": [[1]], "stop": [[True]]}
    # The stream runs to its final response: cancelling the call would cancel the request inside Triton.
    await asyncio.wait_for(fake_triton.request_completed.wait(), 5)
    assert fake_triton.completed == ["req-cancel"]


async def test_a_cancelled_task_stops_the_engine_request(engine, fake_triton):
    fake_triton.steps, fake_triton.delay_s = 50, 0.05

    async def consume():
        async for _ in engine.generate("req-task", "Hi", GenerationParams()):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake_triton.stopped.wait(), 5)
    assert fake_triton.stop_requests[0].id == "req-task"


async def test_ready_and_unreachable_triton(engine):
    assert await engine.is_ready()
    dead = TritonEngine(f"127.0.0.1:{free_port()}", ready_timeout_s=0.5)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert not await dead.is_ready()
        assert loop.time() - started < 2
        with pytest.raises(EngineUnavailableError):
            async for _ in dead.generate("r", "x", GenerationParams()):
                pass
        other = TritonEngine(engine.url, model_name="missing", ready_timeout_s=0.5)
        assert not await other.is_ready()
        await other.close()
    finally:
        await dead.close()


# --- the whole adapter over the fake: uvicorn, TritonEngine, the openai SDK --------------------------------


@pytest_asyncio.fixture(loop_scope="function")
async def adapter_url(fake_triton):
    import uvicorn

    from adapter.app import create_app
    from adapter.settings import Settings

    class Tok:
        chat_template = "unused"
        bos_token = eos_token = None

        def decode(self, ids, skip_special_tokens=True):
            return "".join(f"<{i}>" for i in ids)

        def id_to_token_text(self, token_id):
            return f"t{token_id}"

    settings = Settings(served_model_name="fake", triton_grpc_url=fake_triton.url)
    app = create_app(settings, tokenizer=Tok(), render=lambda template, messages, **_: messages[-1]["content"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    await task


async def test_openai_sdk_against_the_adapter(adapter_url, fake_triton):
    import openai

    client = openai.AsyncOpenAI(base_url=adapter_url, api_key="none", max_retries=0)
    chat = await client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=2, logprobs=True, top_logprobs=1)
    assert chat.choices[0].message.content == "Hello world" and chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == 5 and chat.usage.completion_tokens == 2
    assert [c.token for c in chat.choices[0].logprobs.content] == ["t100", "t101"]

    stream = await client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}],
                                                  stream=True, stream_options={"include_usage": True})
    pieces, finishes, usage = [], [], None
    async for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        usage = chunk.usage or usage
    assert "".join(pieces) == "Hello world" and finishes == ["length"] and usage.total_tokens == 7

    completion = await client.completions.create(model="fake", prompt="Hi", max_tokens=2, logprobs=1)
    assert completion.choices[0].text == "Hello world"
    assert completion.choices[0].logprobs.tokens == ["t100", "t101"]

    fake_triton.error = "in ensemble 'ensemble', This model's maximum context length is 8 tokens."
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="fake", prompt="Hi", stream=True)
    assert "maximum context length" in info.value.message
    fake_triton.error = None
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="Hi")
    await client.close()


async def test_client_disconnect_mid_stream_stops_the_engine_request(adapter_url, fake_triton, caplog):
    import httpx

    fake_triton.steps, fake_triton.delay_s = 100, 0.05
    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream("POST", f"{adapter_url}/chat/completions", json={
            "model": "fake", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
        }) as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if '"Hello"' in line:
                    break  # leave with the request still running
    await asyncio.wait_for(fake_triton.stopped.wait(), 5)
    assert fake_triton.stop_requests[0].id.startswith("chatcmpl-")
    assert fake_triton.stop_requests[0].id == fake_triton.requests[-1].id
    await asyncio.sleep(0.2)
    # A client going away is routine: the response's task ends quietly (uvicorn logs an escaped error).
    assert not [r.getMessage() for r in caplog.records
                if r.levelno >= logging.ERROR and r.name.startswith(("uvicorn", "adapter"))]


async def test_client_disconnect_during_a_whole_request_stops_the_engine_request(adapter_url, fake_triton):
    import httpx

    fake_triton.steps, fake_triton.delay_s = 100, 0.05
    async with httpx.AsyncClient(timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{adapter_url}/completions", json={"model": "fake", "prompt": "Hi", "max_tokens": 100})
    await asyncio.wait_for(fake_triton.stopped.wait(), 5)
    assert fake_triton.stop_requests[0].id.startswith("cmpl-")
