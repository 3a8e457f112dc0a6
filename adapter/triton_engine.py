"""The only code that knows Triton: OpenAI-free `GenerationParams` in, `EngineChunk`s out, over gRPC streaming.

One `tritonclient.grpc.aio.InferenceServerClient` (one channel) is shared by all requests, and so is one
bidirectional `ModelStreamInfer` stream (`SharedStream`): each request is one message on it, with
`triton_enable_empty_final_response`, so the end of a request is always marked by Triton's final flag, and each
response names its request. The stream goes to the engine model, with the
ensemble's preprocessing and postprocessing steps run here (`adapter.pipeline_steps`), when the adapter has the
model's tokenizer; otherwise to the `ensemble`.

Cancellation: when a caller stops reading before the final response (client disconnect), a `stop = true` request
with the same request id is sent to the engine model, as TensorRT-LLM's backend expects, on a call of its own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, serialize_byte_tensor, triton_to_np_dtype

from adapter.engine import EngineChunk, GenerationParams
from adapter.errors import (
    APIError,
    BadRequestError,
    ContextLengthError,
    EngineInternalError,
    EngineOverloadedError,
    EngineUnavailableError,
)
from adapter.pipeline_steps import PipelineSteps
from pipeline.tensors import InvalidRequest

logger = logging.getLogger("adapter.triton")

Tensors = dict[str, np.ndarray]

# Prompts up to this many characters (and token-id prompts) are preprocessed on the event loop.
INLINE_PROMPT_CHARS = 1000

# --- request tensors ----------------------------------------------------------------------------------------

# GenerationParams field -> (ensemble input, numpy dtype) for the optional scalars; None values are not sent.
_OPTIONAL_SCALARS: tuple[tuple[str, str, type], ...] = (
    ("temperature", "temperature", np.float32),
    ("top_p", "top_p", np.float32),
    ("top_k", "top_k", np.int32),
    ("min_p", "min_p", np.float32),
    ("presence_penalty", "presence_penalty", np.float32),
    ("frequency_penalty", "frequency_penalty", np.float32),
    ("repetition_penalty", "repetition_penalty", np.float32),
    ("min_tokens", "min_tokens", np.int32),
    ("ignore_eos", "ignore_eos", np.bool_),
    ("skip_special_tokens", "skip_special_tokens", np.bool_),
    ("include_stop_str_in_output", "include_stop_str_in_output", np.bool_),
    ("add_special_tokens", "add_special_tokens", np.bool_),
)


def _scalar(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def ensemble_inputs(prompt: str | list[int], params: GenerationParams) -> Tensors:
    """The `ensemble` input tensors of one request (batch dimension 1), as docs/tensors.md defines them."""
    tensors: Tensors = {}
    if isinstance(prompt, str):
        tensors["text_input"] = np.array([[prompt.encode("utf-8")]], dtype=np.object_)
    else:
        tensors["text_input"] = np.array([[b""]], dtype=np.object_)  # required; ignored with input_token_ids
        tensors["input_token_ids"] = np.array([list(prompt)], dtype=np.int32)
    # max_tokens <= 0 is our ensemble's "as many as the context leaves".
    tensors["max_tokens"] = _scalar(params.max_tokens or 0, np.int32)
    # Always streamed from the engine, even for a client that wants one response (the serving layer joins
    # the chunks): a stop string then ends generation where it matches instead of at max_tokens.
    tensors["stream"] = _scalar(True, np.bool_)
    tensors["exclude_input_in_output"] = _scalar(True, np.bool_)
    for field, name, dtype in _OPTIONAL_SCALARS:
        value = getattr(params, field)
        if value is not None:
            tensors[name] = _scalar(value, dtype)
    if params.seed is not None:
        tensors["seed"] = _scalar(params.seed % 2**64, np.uint64)
    if params.stop:
        tensors["stop_words"] = np.array([[s.encode("utf-8") for s in params.stop]], dtype=np.object_)
    if params.stop_token_ids:
        tensors["stop_token_ids"] = np.array([list(params.stop_token_ids)], dtype=np.int32)
    if params.logit_bias:
        tensors["logit_bias_ids"] = np.array([[t for t, _ in params.logit_bias]], dtype=np.int32)
        tensors["logit_bias_values"] = np.array([[b for _, b in params.logit_bias]], dtype=np.float32)
    if params.return_log_probs:
        tensors["return_log_probs"] = _scalar(True, np.bool_)
        tensors["top_logprobs"] = _scalar(params.top_logprobs or 0, np.int32)
    return tensors


_OUTPUTS = ("text_output", "output_token_ids", "finish_reason", "stop_reason", "num_input_tokens", "num_cached_tokens",
            "num_output_tokens")
_LOG_PROB_OUTPUTS = ("cum_log_probs", "output_log_probs", "top_logprob_ids", "top_logprob_values")


def ensemble_outputs(params: GenerationParams) -> tuple[str, ...]:
    """The `ensemble` outputs a request reads: Triton serializes each one into every streamed response."""
    return _OUTPUTS + _LOG_PROB_OUTPUTS if params.return_log_probs else _OUTPUTS


def stop_request_inputs() -> Tensors:
    """The minimal `tensorrt_llm` request that cancels the running request of the same id."""
    return {
        "input_ids": np.array([[0]], dtype=np.int32),
        "input_lengths": np.array([[1]], dtype=np.int32),
        "request_output_len": np.array([[1]], dtype=np.int32),
        "stop": np.array([[True]], dtype=np.bool_),
    }


_triton_dtype = functools.cache(np_to_triton_dtype)  # tritonclient's is a chain of dtype comparisons


def infer_request(
    model_name: str, request_id: str, tensors: Tensors, outputs: tuple[str, ...] = ()
) -> service_pb2.ModelInferRequest:
    """A KServe v2 request with raw tensor contents and Triton's empty-final-response flag, asking for `outputs`
    (all of the model's outputs when empty)."""
    request = service_pb2.ModelInferRequest(model_name=model_name, id=request_id)
    for name in outputs:
        request.outputs.add().name = name
    for name, array in tensors.items():
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = _triton_dtype(array.dtype)
        tensor.shape.extend(array.shape)
        if array.dtype == np.object_:
            raw = serialize_byte_tensor(array)  # a 0-d object array holding the encoded bytes
            request.raw_input_contents.append(raw.item() if raw.size else b"")
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    # tritonclient's aio stream_infer cannot set this ("triton_" parameters are reserved there).
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


# --- response tensors ---------------------------------------------------------------------------------------


def _first_str(array: np.ndarray | None) -> str | None:
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _first_int(array: np.ndarray | None) -> int | None:
    return None if array is None or array.size == 0 else int(array.reshape(-1)[0])


def output_arrays(response: service_pb2.ModelInferResponse) -> Tensors:
    """The outputs a response carries, by name. Read here in one pass: `InferResult.as_numpy` looks each name up
    in the list of outputs, a tenth of the adapter's CPU per streamed token."""
    arrays: Tensors = {}
    for output, raw in zip(response.outputs, response.raw_output_contents):
        if output.datatype == "BYTES":
            array = deserialize_bytes_tensor(raw)
        else:
            array = np.frombuffer(raw, dtype=triton_to_np_dtype(output.datatype))
        arrays[output.name] = array.reshape(tuple(output.shape))
    return arrays


def streamed_token_ids(response: service_pb2.ModelInferResponse, tokens: str, length: str) -> list[int] | None:
    """The new token ids of a response that carries only INT32 `tokens` and their `length` (the engine's streamed
    responses between its first and last), read without numpy; None for any other response."""
    if len(response.outputs) != 2:
        return None
    found = {}
    for output, raw in zip(response.outputs, response.raw_output_contents):
        if output.datatype != "INT32":
            return None
        found[output.name] = memoryview(raw).cast("i")  # Triton's raw tensors are little-endian, as this host
    ids, count = found.get(tokens), found.get(length)
    return ids[:count[0]].tolist() if ids is not None and count is not None and len(count) else None


def parse_outputs(outputs: Tensors) -> EngineChunk:
    """One response's ensemble outputs as an EngineChunk; outputs that are absent read as empty."""
    token_ids = outputs.get("output_token_ids")
    ids = [int(t) for t in token_ids.reshape(-1)] if token_ids is not None else []
    log_probs = outputs.get("output_log_probs")  # [1, beam, tokens]
    top_ids = outputs.get("top_logprob_ids")  # [1, tokens, N]
    top_values = outputs.get("top_logprob_values")
    top: list[list[tuple[int, float]]] | None = None
    if top_ids is not None and top_values is not None and top_ids.size and top_ids.ndim >= 2:
        width = top_ids.shape[-1]
        top = [
            [(int(i), float(v)) for i, v in zip(row_ids, row_values) if i >= 0]
            for row_ids, row_values in zip(top_ids.reshape(-1, width), top_values.reshape(-1, width))
        ]
    cum = outputs.get("cum_log_probs")
    return EngineChunk(
        text=_first_str(outputs.get("text_output")) or "",
        token_ids=ids,
        log_probs=[float(v) for v in log_probs.reshape(-1)] if log_probs is not None and log_probs.size else None,
        top_logprobs=top,
        finish_reason=_first_str(outputs.get("finish_reason")) or None,
        stop_reason=_first_str(outputs.get("stop_reason")) or None,
        num_input_tokens=_first_int(outputs.get("num_input_tokens")),
        num_cached_tokens=_first_int(outputs.get("num_cached_tokens")),
        num_output_tokens=_first_int(outputs.get("num_output_tokens")),
        cum_log_prob=float(cum.reshape(-1)[0]) if cum is not None and cum.size else None,
    )


def is_final(response: service_pb2.ModelInferResponse) -> bool:
    params = response.parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


# --- errors -------------------------------------------------------------------------------------------------

# Triton's wrappers around a model's own message: "in ensemble 'ensemble', [request id: x] Failed to process
# the request(s) for model instance 'preprocessing_0_0', message: InvalidRequest: ...".
_PREFIXES = re.compile(
    r"^(?:in ensemble '[^']*',\s*|\[request id: [^\]]*\]\s*|Failed to process the request\(s\) for model "
    r"(?:instance )?'[^']*', message:\s*|(?:[\w.]+\.)?InvalidRequest:\s*|pb_utils\.TritonError:\s*)+"
)
_OVERLOADED = re.compile(
    r"queue (?:is )?full|maximum queue size|exceeds? .*queue|too many (?:active |pending )?requests"
    r"|maximum number of (?:active |in-flight )?requests",
    re.I,
)
_UNAVAILABLE = re.compile(r"unknown model|is not found|not ready|no available version|is unavailable|"
                          r"server is (?:stopping|shutting down|not ready)|stopped accepting", re.I)
_CONTEXT_LENGTH = re.compile(r"maximum context length", re.I)
# Bad input: Triton's own input checks, and the ensemble's InvalidRequest messages.
_BAD_INPUT = re.compile(
    r"InvalidRequest|maximum context length|prompt is empty|out of range|not supported|must be|"
    r"unexpected (?:inference )?input|unexpected shape|expected .* inputs?|data-?type|input byte size|"
    r"invalid argument|is not a valid|cannot be|too long|exceeds? the",
    re.I,
)


def clean_message(message: str) -> str:
    return _PREFIXES.sub("", message.strip()).strip() or message.strip()


def error_from_message(message: str) -> APIError:
    """A Triton in-stream error (a message only; gRPC streams carry no status) as our typed error."""
    cleaned = clean_message(message)
    if _OVERLOADED.search(message):
        return EngineOverloadedError(cleaned)
    if _UNAVAILABLE.search(message):
        return EngineUnavailableError(cleaned)
    if _CONTEXT_LENGTH.search(message):
        return ContextLengthError(cleaned)
    if _BAD_INPUT.search(message):
        return BadRequestError(cleaned)
    logger.error("engine error: %s", message)
    return EngineInternalError()


def error_from_invalid_request(exc: InvalidRequest) -> APIError:
    """Preprocessing's verdict on a request when the adapter runs it: always the client's to fix."""
    message = str(exc)
    return ContextLengthError(message) if _CONTEXT_LENGTH.search(message) else BadRequestError(message)


def error_from_rpc(error: grpc.aio.AioRpcError) -> APIError:
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequestError(clean_message(details))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return EngineOverloadedError(clean_message(details) or "The server is busy; retry shortly.")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED):
        logger.warning("triton unavailable: %s %s", code.name, details)
        return EngineUnavailableError()
    logger.error("triton rpc failed: %s %s", code.name, details)
    return EngineInternalError()


# --- the engine ---------------------------------------------------------------------------------------------


class SharedStream:
    """One `ModelStreamInfer` call that carries many requests, each response handed to its request's queue by the
    id it names (Triton names it in error responses too). Against a call per request this saves each request a
    call's set-up and teardown: ~0.5 ms of a first token and ~1 ms of CPU between the adapter and Triton.

    A request's queue gets its responses; when the call ends, every open request's queue gets the gRPC error, or
    None if Triton closed it. A stream that ended is not reused (`alive`)."""

    def __init__(self, stub):
        self._outbox: asyncio.Queue[service_pb2.ModelInferRequest | None] = asyncio.Queue()
        self._routes: dict[str, asyncio.Queue] = {}
        self.alive = True
        self._call = stub.ModelStreamInfer(self._requests())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _requests(self) -> AsyncIterator[service_pb2.ModelInferRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    def send(self, request: service_pb2.ModelInferRequest) -> asyncio.Queue:
        """Sends `request`; its responses arrive in the returned queue until `forget`."""
        responses: asyncio.Queue = asyncio.Queue()
        self._routes[request.id] = responses
        self._outbox.put_nowait(request)
        return responses

    def forget(self, request_id: str) -> None:
        self._routes.pop(request_id, None)

    async def _read(self) -> None:
        end: grpc.aio.AioRpcError | None = None
        try:
            async for response in self._call:
                responses = self._routes.get(response.infer_response.id)
                if responses is not None:
                    responses.put_nowait(response)
                elif response.error_message:
                    logger.warning("error for no open request: %s", clean_message(response.error_message))
        except grpc.aio.AioRpcError as exc:
            end = exc
        finally:
            self.alive = False
            routes, self._routes = self._routes, {}
            for responses in routes.values():
                responses.put_nowait(end)

    async def close(self, timeout_s: float) -> None:
        """Half-closes the call, so Triton ends it once its requests are answered, and waits for that."""
        self._outbox.put_nowait(None)
        await asyncio.wait([self._reader], timeout=timeout_s)
        self._call.cancel()
        self._reader.cancel()


class TritonEngine:
    """Generation through Triton over one shared gRPC channel: from the engine model with the ensemble's other steps
    run here, or through the `ensemble`."""

    def __init__(
        self,
        url: str,
        model_name: str = "ensemble",
        engine_model_name: str = "tensorrt_llm",
        *,
        ready_timeout_s: float = 2.0,
        cancel_timeout_s: float = 10.0,
        tokenizer=None,
    ):
        """With a `tokenizer`, requests run the ensemble's preprocessing and postprocessing steps here and stream
        from the engine model (`PipelineSteps`); without one, through the ensemble."""
        self.url = url
        self.model_name = model_name
        self.engine_model_name = engine_model_name
        self.ready_timeout_s = ready_timeout_s
        self.cancel_timeout_s = cancel_timeout_s
        self._client = InferenceServerClient(url)  # create inside the running event loop (the app's lifespan)
        self._background: set[asyncio.Task] = set()
        self._in_flight: set[str] = set()  # the request ids of open generate() streams
        self._stream: SharedStream | None = None
        self._tokenizer = tokenizer
        self._steps: PipelineSteps | None = None
        self._steps_known = tokenizer is None  # whether _steps is settled (read from Triton once it answers)

    async def close(self) -> None:
        # At shutdown uvicorn cancels the streaming tasks without closing their generators, so the requests
        # still running are stopped here, while Triton takes requests (it would otherwise wait for each).
        if self._in_flight:
            logger.info("stopping %d in-flight request(s) in the engine", len(self._in_flight))
            await asyncio.gather(*(self.cancel(request_id) for request_id in list(self._in_flight)))
        if self._stream is not None:
            await self._stream.close(self.cancel_timeout_s)  # ends once the stopped requests have ended
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.cancel_timeout_s)
        await self._client.close()

    async def is_ready(self) -> bool:
        """Triton live and the ensemble ready, asked now with a short deadline; any failure reads as not ready."""
        t = self.ready_timeout_s
        try:
            async with asyncio.timeout(t + 0.5):
                return bool(await self._client.is_server_live(client_timeout=t)) and bool(
                    await self._client.is_model_ready(self.model_name, client_timeout=t)
                )
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    async def _pipeline_steps(self) -> PipelineSteps | None:
        """The served ensemble's steps, read from Triton the first time it answers; None: use the ensemble."""
        if not self._steps_known:
            try:
                ensemble = await self._client.get_model_config(self.model_name, as_json=True)
                scheduling = ensemble["config"].get("ensemble_scheduling", {})
                first_step = next((step["model_name"] for step in scheduling.get("step", [])), None)
                preprocessing = await self._client.get_model_config(first_step, as_json=True) if first_step else {}
            except Exception as exc:  # noqa: BLE001 - Triton not up yet: this request goes through the ensemble
                logger.warning("could not read the ensemble's steps from Triton: %s", exc)
                return None
            self._steps = PipelineSteps.from_configs(ensemble["config"], preprocessing.get("config", {}),
                                                     self._tokenizer)
            self._steps_known = True
            logger.info("preprocessing and postprocessing: %s", "in the adapter" if self._steps else "in Triton")
        return self._steps

    async def _engine_request(
        self, request_id: str, prompt: str | list[int], params: GenerationParams
    ) -> tuple[service_pb2.ModelInferRequest, Callable[[service_pb2.ModelInferResponse], EngineChunk]]:
        """The gRPC request to send, and how to read each of its responses."""
        tensors = ensemble_inputs(prompt, params)
        steps = await self._pipeline_steps()
        if steps is None:
            request = infer_request(self.model_name, request_id, tensors, ensemble_outputs(params))
            return request, lambda response: parse_outputs(output_arrays(response))
        try:
            # Tokenizing takes ~0.5 us per character of text; a long prompt goes off the event loop, while a short
            # one costs less than the hop to a thread and back (~0.3 ms of a first token).
            if isinstance(prompt, str) and len(prompt) > INLINE_PROMPT_CHARS:
                engine_inputs = await asyncio.to_thread(steps.engine_inputs, tensors, request_id)
            else:
                engine_inputs = steps.engine_inputs(tensors, request_id)
        except InvalidRequest as exc:
            raise error_from_invalid_request(exc) from None
        postprocess = steps.postprocessor(engine_inputs, stop_engine=lambda key: self._in_background(self.cancel(key)))
        request = infer_request(steps.engine.model, request_id, engine_inputs, steps.engine_outputs)

        def read(response: service_pb2.ModelInferResponse) -> EngineChunk:
            token_ids = streamed_token_ids(response, *steps.token_outputs) if steps.token_outputs else None
            if token_ids is None:  # the last response, or one with log probabilities
                return parse_outputs(postprocess(output_arrays(response)))
            return EngineChunk(text=postprocess.text(token_ids), token_ids=token_ids,
                               num_input_tokens=postprocess.prompt_tokens)

        return request, read

    async def generate(
        self, request_id: str, prompt: str | list[int], params: GenerationParams
    ) -> AsyncIterator[EngineChunk]:
        request, read = await self._engine_request(request_id, prompt, params)
        if self._stream is None or not self._stream.alive:
            self._stream = SharedStream(self._client._client_stub)  # noqa: SLF001 - see _open_stream
        stream = self._stream
        # The responses are read by the stream's own task: when the consumer of this generator is cancelled (a
        # client went away), nothing is cancelled in Triton with it. Cancelling a gRPC call cancels its requests
        # inside Triton, and Triton 2.51's ensemble then sometimes never completes the request: it stays in flight,
        # and Triton's shutdown waits for it until killed. An abandoned request is stopped in the engine instead,
        # and its responses read to its end.
        responses = stream.send(request)
        self._in_flight.add(request_id)
        finished = False
        try:
            while (response := await responses.get()) is not None:
                if isinstance(response, grpc.aio.AioRpcError):
                    finished = True
                    raise error_from_rpc(response)
                if response.error_message:
                    finished = True
                    raise error_from_message(response.error_message)
                final = is_final(response.infer_response)
                chunk = read(response.infer_response) if response.infer_response.outputs else None
                finished = finished or final or (chunk is not None and chunk.finish_reason is not None)
                if chunk is not None:
                    yield chunk
                if final:
                    return
            finished = True  # Triton closed the stream: nothing left to cancel
        finally:
            self._in_flight.discard(request_id)
            if finished:
                stream.forget(request_id)
            else:
                logger.info("request %s abandoned before its end: stopping it in the engine", request_id)
                self._in_background(self._stop_and_drain(request_id, stream, responses))

    async def _stop_and_drain(self, request_id: str, stream: SharedStream, responses: asyncio.Queue) -> None:
        """Stop an abandoned request in the engine, then read its responses to its final one."""
        try:
            await self.cancel(request_id)
            async with asyncio.timeout(self.cancel_timeout_s):
                while (response := await responses.get()) is not None and not isinstance(response, Exception):
                    if response.error_message or is_final(response.infer_response):
                        break
        except TimeoutError:
            logger.warning("request %s did not end within %s s of its stop request", request_id, self.cancel_timeout_s)
        finally:
            stream.forget(request_id)

    async def cancel(self, request_id: str) -> None:
        """Ask the engine model to stop `request_id` (a `stop = true` request with the same id); never raises."""
        request = infer_request(self.engine_model_name, request_id, stop_request_inputs())
        call, done = self._open_stream(request)
        try:
            async with asyncio.timeout(self.cancel_timeout_s):
                async for response in call:
                    if response.error_message:
                        logger.warning("stop request %s failed: %s", request_id, clean_message(response.error_message))
                        return
                    if is_final(response.infer_response):
                        return
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            logger.warning("stop request %s got no answer: %s", request_id, exc)
        finally:
            done.set()
            call.cancel()

    def _open_stream(self, request: service_pb2.ModelInferRequest):
        """One ModelStreamInfer call carrying `request`; the request side stays open until `done` is set."""
        done = asyncio.Event()

        async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
            yield request
            await done.wait()

        # The client's own stub: its public stream_infer cannot ask for the empty final response.
        call = self._client._client_stub.ModelStreamInfer(requests())  # noqa: SLF001
        return call, done

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

