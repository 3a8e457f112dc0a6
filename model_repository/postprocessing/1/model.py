"""Triton shell over pipeline.postprocess (the logic lives and is tested there)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from launcher.startup_heap import freeze_startup_heap
from pipeline.postprocess import Postprocessor
from pipeline.triton_io import ModelShell, error_response, response
from tokenization.tokenizer import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        self.shell = ModelShell(args)
        self.engine_model = self.shell.parameters["engine_model_name"]
        tokenizer = Tokenizer.from_dir(self.shell.parameters["tokenizer_dir"])
        self.postprocess = Postprocessor(tokenizer, stop_engine=self._stop_engine)
        freeze_startup_heap()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(response(self.postprocess(self.shell.inputs(request))))
            except Exception as exc:  # a bad response must not take the others down
                pb_utils.Logger.log_error(f"postprocessing failed: {exc!r}")
                responses.append(error_response(f"postprocessing failed: {exc}", pb_utils.TritonError.INTERNAL))
        return responses

    def _stop_engine(self, key: str) -> None:
        """A stop string matched: cancel the engine request, as TensorRT-LLM's backend is cancelled."""
        inputs = [
            pb_utils.Tensor("input_ids", np.zeros((1, 1), dtype=np.int32)),
            pb_utils.Tensor("input_lengths", np.ones((1, 1), dtype=np.int32)),
            pb_utils.Tensor("request_output_len", np.ones((1, 1), dtype=np.int32)),
            pb_utils.Tensor("stop", np.ones((1, 1), dtype=np.bool_)),
        ]
        stop = pb_utils.InferenceRequest(
            model_name=self.engine_model, inputs=inputs, requested_output_names=[], request_id=key
        )
        for reply in stop.exec(decoupled=True):
            if reply.has_error():
                pb_utils.Logger.log_warn(f"stopping engine request {key} failed: {reply.error().message()}")
