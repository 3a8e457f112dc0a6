"""The `tensorrt_llm` step's tensors, in TensorRT-LLM's names, to and from the CPU engine's Python types."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import GenerationOutput, SamplingParams
from pipeline.context import RequestContext
from pipeline.tensors import InvalidRequest, Tensors, decode_word_lists, int_tensor, scalar, string_tensor, vector


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    exclude_input_in_output: bool
    context_json: str  # echoed unchanged on every response
    key: str  # what a stop request names to cancel this one
    outputs: frozenset[str] | None = None  # the outputs the request asked for (Triton drops the others); None: all


def is_stop_request(inputs: Tensors) -> bool:
    return bool(scalar(inputs, "stop", False))


def parse_request(inputs: Tensors, request_id: str, requested_outputs=()) -> EngineRequest:
    """`requested_outputs`: the request's output names as Triton lists them (all of the model's when the client
    named none); empty reads as all."""
    input_ids = inputs["input_ids"].reshape(-1)
    length = scalar(inputs, "input_lengths", len(input_ids))
    prompt_ids = [int(t) for t in input_ids[:length]]
    if scalar(inputs, "beam_width", 1) != 1:
        raise InvalidRequest("beam search is not supported by the CPU engine (beam_width must be 1)")
    if scalar(inputs, "num_return_sequences", 1) != 1:
        raise InvalidRequest("num_return_sequences must be 1: send one request per sequence")

    temperature = scalar(inputs, "temperature")
    top_k = scalar(inputs, "runtime_top_k")
    top_p = scalar(inputs, "runtime_top_p")
    # TensorRT-LLM decodes greedily when no sampling parameter is given; so do we.
    greedy_by_default = temperature is None and top_k is None and top_p is None
    end_id = scalar(inputs, "end_id", -1)
    params = SamplingParams(
        max_new_tokens=int(scalar(inputs, "request_output_len")),
        end_ids=set() if end_id is None or end_id < 0 else {int(end_id)},
        temperature=0.0 if greedy_by_default else float(1.0 if temperature is None else temperature),
        top_k=int(top_k or 0),
        top_p=float(1.0 if not top_p else top_p),  # TensorRT-LLM reads top_p = 0 as "off"
        min_p=float(scalar(inputs, "runtime_min_p", 0.0)),
        seed=scalar(inputs, "seed"),
        repetition_penalty=float(scalar(inputs, "repetition_penalty", 1.0)),
        presence_penalty=float(scalar(inputs, "presence_penalty", 0.0)),
        frequency_penalty=float(scalar(inputs, "frequency_penalty", 0.0)),
        min_tokens=int(scalar(inputs, "min_tokens", 0)),
        stop_words=decode_word_lists(inputs.get("stop_words_list")),
        bad_words=decode_word_lists(inputs.get("bad_words_list")),
        logit_bias=logit_bias(inputs),
        return_log_probs=bool(scalar(inputs, "return_log_probs", False)),
        top_logprobs=int(scalar(inputs, "top_logprobs", 0)),
        streaming=bool(scalar(inputs, "streaming", False)),
    )
    context_json = scalar(inputs, "request_context") or RequestContext(key=request_id).to_json()
    key = request_id or RequestContext.from_json(context_json).key
    return EngineRequest(
        prompt_ids=prompt_ids,
        params=params,
        exclude_input_in_output=bool(scalar(inputs, "exclude_input_in_output", False)),
        context_json=context_json,
        key=key,
        outputs=frozenset(requested_outputs) or None,
    )


def logit_bias(inputs: Tensors) -> dict[int, float]:
    ids, values = vector(inputs, "logit_bias_ids"), vector(inputs, "logit_bias_values")
    if len(ids) != len(values):
        raise InvalidRequest(f"logit_bias_ids has {len(ids)} entries but logit_bias_values has {len(values)}")
    return {int(token): float(bias) for token, bias in zip(ids, values)}


def stop_reason_text(reason) -> str:
    if reason is None:
        return ""
    if isinstance(reason, int):
        return str(reason)
    return " ".join(str(t) for t in reason)


def response_tensors(request: EngineRequest, output: GenerationOutput) -> Tensors:
    """One response in TensorRT-LLM's shapes: [batch, beam, tokens] ids, plus our extension tensors.

    Only the outputs the request asked for; log-probability tensors only when the request asked for them, and the
    finish and stop reasons only on the last response: every tensor is copied at each hop (engine, Triton,
    postprocessing, gRPC), once per streamed token."""
    token_ids = list(output.token_ids)
    if output.finished and not request.params.streaming and not request.exclude_input_in_output:
        token_ids = request.prompt_ids + token_ids  # TensorRT-LLM's default for non-streamed output
    tensors = {
        "output_ids": np.array([[token_ids]], dtype=np.int32),
        "sequence_length": np.array([[len(token_ids)]], dtype=np.int32),
        "num_input_tokens": int_tensor(output.num_input_tokens),
        "num_output_tokens": int_tensor(output.num_output_tokens),
        "request_context": string_tensor(request.context_json),
    }
    if request.params.return_log_probs:
        tensors.update(log_prob_tensors(output))
    if output.finished:
        tensors["finish_reason"] = string_tensor(output.finish_reason or "")
        tensors["stop_reason"] = string_tensor(stop_reason_text(output.stop_reason))
        tensors["num_cached_tokens"] = int_tensor(output.num_cached_tokens)
    if request.outputs is not None:
        return {name: array for name, array in tensors.items() if name in request.outputs}
    return tensors


def log_prob_tensors(output: GenerationOutput) -> Tensors:
    log_probs = list(output.log_probs or [])
    top = output.top_logprobs or []
    width = max((len(row) for row in top), default=0)
    top_ids = np.full((len(top), width), -1, dtype=np.int32)
    top_values = np.full((len(top), width), -np.inf, dtype=np.float32)
    for i, row in enumerate(top):
        for j, (token, value) in enumerate(row):
            top_ids[i, j], top_values[i, j] = token, value
    return {
        "cum_log_probs": np.array([[output.cum_log_prob or 0.0]], dtype=np.float32),
        "output_log_probs": np.array([[log_probs]], dtype=np.float32).reshape(1, 1, len(log_probs)),
        "top_logprob_ids": top_ids[None],
        "top_logprob_values": top_values[None],
    }
