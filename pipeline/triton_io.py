"""Helpers shared by the Triton model shells; importable only inside Triton's Python backend."""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from pipeline.tensors import Tensors


class ModelShell:
    """What every shell needs: its config, its parameters and its requests' inputs."""

    def __init__(self, args: dict):
        self.model_config = json.loads(args["model_config"])
        self.parameters = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}

    def inputs(self, request) -> Tensors:
        # One pass over what the request carries: a lookup per declared name searches them all each time.
        return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}


def response(tensors: Tensors) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in tensors.items()])


def error_response(message: str, code=None) -> "pb_utils.InferenceResponse":
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
