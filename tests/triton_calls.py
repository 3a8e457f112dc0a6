"""Calling the ensemble and the engine over real gRPC with tritonclient, as a gRPC user would."""

from __future__ import annotations

import queue
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient

TYPES = {np.int32: "INT32", np.float32: "FP32", np.uint64: "UINT64", np.bool_: "BOOL", np.object_: "BYTES"}


def tensor(name: str, values, dtype) -> grpcclient.InferInput:
    array = np.array([values], dtype=dtype)
    if array.ndim == 1:
        array = array.reshape(1, 1)
    if dtype is np.object_:
        array = np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else s, otypes=[object])(array)
    infer_input = grpcclient.InferInput(name, list(array.shape), TYPES[dtype])
    infer_input.set_data_from_numpy(array)
    return infer_input


def ensemble_inputs(prompt: str, max_tokens: int, stream: bool, **options) -> list[grpcclient.InferInput]:
    dtypes = {
        "stop_words": np.object_, "bad_words": np.object_, "temperature": np.float32, "top_p": np.float32,
        "top_k": np.int32, "seed": np.uint64, "return_log_probs": np.bool_, "top_logprobs": np.int32,
        "exclude_input_in_output": np.bool_, "include_stop_str_in_output": np.bool_, "ignore_eos": np.bool_,
        "min_tokens": np.int32, "end_id": np.int32, "stop_token_ids": np.int32,
        "logit_bias_ids": np.int32, "logit_bias_values": np.float32,
    }
    inputs = [tensor("text_input", [prompt], np.object_), tensor("max_tokens", [max_tokens], np.int32),
              tensor("stream", [stream], np.bool_)]
    options.setdefault("exclude_input_in_output", True)
    for name, value in options.items():
        values = value if isinstance(value, list) else [value]
        inputs.append(tensor(name, values, dtypes[name]))
    return inputs


def engine_inputs(prompt_ids: list[int], max_tokens: int) -> list[grpcclient.InferInput]:
    """A streamed request straight to the `tensorrt_llm` model, in TensorRT-LLM's tensors."""
    return [tensor("input_ids", prompt_ids, np.int32), tensor("input_lengths", [len(prompt_ids)], np.int32),
            tensor("request_output_len", [max_tokens], np.int32), tensor("streaming", [True], np.bool_)]


@dataclass
class Result:
    chunks: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stop_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    responses: int = 0
    output_names: list[set[str]] = field(default_factory=list)  # of each response

    @property
    def text(self) -> str:
        return "".join(self.chunks)


class TritonStream:
    """One gRPC stream: send requests, read responses until each request's final one."""

    def __init__(self, url: str):
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, model: str, inputs, request_id: str = "", outputs: list[str] | None = None) -> None:
        """`outputs`: the output names to ask for; None asks for none by name, which Triton reads as all."""
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
        self.client.async_stream_infer(model, inputs, request_id=request_id, outputs=requested,
                                       enable_empty_final_response=True)

    def read(self, result: Result, timeout: float = 60.0, until_final: bool = True, max_responses: int | None = None):
        while True:
            response, error = self.responses.get(timeout=timeout)
            if error is not None:
                result.error = str(error)
                return result
            result.responses += 1
            outputs = {o.name for o in response.get_response().outputs}
            result.output_names.append(outputs)
            if "text_output" in outputs:
                result.chunks.append(response.as_numpy("text_output").reshape(-1)[0].decode("utf-8"))
                result.token_ids += response.as_numpy("output_token_ids").reshape(-1).tolist()
                if "finish_reason" in outputs:  # only on the last response
                    result.finish_reason = response.as_numpy("finish_reason").reshape(-1)[0].decode()
                    result.stop_reason = response.as_numpy("stop_reason").reshape(-1)[0].decode()
                result.num_input_tokens = int(response.as_numpy("num_input_tokens").reshape(-1)[0])
                result.num_output_tokens = int(response.as_numpy("num_output_tokens").reshape(-1)[0])
            final = response.get_response().parameters["triton_final_response"].bool_param
            if (until_final and final) or (max_responses and result.responses >= max_responses):
                return result

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def generate(url: str, prompt: str, max_tokens: int, stream: bool, request_id: str = "", **options) -> Result:
    connection = TritonStream(url)
    try:
        connection.send("ensemble", ensemble_inputs(prompt, max_tokens, stream, **options), request_id)
        return connection.read(Result())
    finally:
        connection.close()


def stop_engine_request(connection: TritonStream, request_id: str) -> None:
    """TensorRT-LLM's way to cancel: a request to the engine model with the same id and stop = true."""
    connection.send(
        "tensorrt_llm",
        [tensor("input_ids", [0], np.int32), tensor("input_lengths", [1], np.int32),
         tensor("request_output_len", [1], np.int32), tensor("stop", [True], np.bool_)],
        request_id,
    )


def engine_gauge(stack, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported")


def wait_for_gauge(stack, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine_gauge(stack, name) != value:
        assert time.monotonic() < deadline, f"{name} did not reach {value}"
        time.sleep(0.1)
