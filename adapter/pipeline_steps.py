"""The ensemble's preprocessing and postprocessing steps, run in the adapter around a stream from its engine step.

Through Triton's ensemble every streamed response crosses Triton twice more (engine, postprocessing, client): at
one stream that hop costs ~1.4 ms of CPU per token on the cores the engine computes on (`bench.stack_layers`).
vLLM's and NIM's front ends tokenize and detokenize in the API process for the same reason. Here the wiring is the
served ensemble's own, read from Triton's config of it, and the steps are the code its models run
(`pipeline.preprocess`, `pipeline.postprocess`), so a request gets what the ensemble would give it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.postprocess import Postprocessor
from pipeline.preprocess import Preprocessor
from pipeline.tensors import Tensors, scalar

PREPROCESSING, POSTPROCESSING = "preprocessing", "postprocessing"

# Engine outputs that repeat one of the request's own inputs on every response (docs/tensors.md), by the input they
# repeat. The ensemble needs them there; the adapter has them already, so it does not ask for them, and the engine
# does not send them: each tensor costs every hop of every streamed token.
ECHOED_INPUTS = {"request_context": "request_context", "num_input_tokens": "input_lengths"}
# Nor for the running count of generated tokens: the adapter counts the tokens it receives (RequestProgress).
COUNTED_HERE = ("num_output_tokens",)


@dataclass(frozen=True)
class Step:
    """One ensemble step: its model and how its tensors are named in the ensemble."""

    model: str
    input_map: dict[str, str]  # the model's input -> the ensemble tensor it reads
    output_map: dict[str, str]  # the model's output -> the ensemble tensor it writes

    def inputs(self, tensors: Tensors) -> Tensors:
        return {name: tensors[source] for name, source in self.input_map.items() if source in tensors}

    def outputs(self, produced: Tensors) -> Tensors:
        return {self.output_map[name]: array for name, array in produced.items() if name in self.output_map}


@dataclass(frozen=True)
class PipelineSteps:
    """preprocessing -> engine -> postprocessing as the served ensemble wires them; only the engine runs in Triton."""

    preprocessing: Step
    engine: Step
    postprocessing: Step
    preprocessor: Preprocessor

    @classmethod
    def from_configs(cls, ensemble: dict, preprocessing: dict, tokenizer) -> PipelineSteps | None:
        """From Triton's model configs (JSON) of the ensemble and its preprocessing model; None when the ensemble
        is not preprocessing -> engine -> postprocessing with our preprocessing's parameters."""
        steps = [Step(s["model_name"], dict(s.get("input_map", {})), dict(s.get("output_map", {})))
                 for s in ensemble.get("ensemble_scheduling", {}).get("step", [])]
        max_seq_len = preprocessing.get("parameters", {}).get("max_seq_len", {}).get("string_value")
        if len(steps) != 3 or (steps[0].model, steps[2].model) != (PREPROCESSING, POSTPROCESSING) or not max_seq_len:
            return None
        return cls(*steps, preprocessor=Preprocessor(tokenizer, max_seq_len=int(max_seq_len)))

    def engine_inputs(self, ensemble_inputs: Tensors, request_id: str) -> Tensors:
        """The engine step's inputs for a request given as the ensemble's inputs (raises InvalidRequest)."""
        tensors = dict(ensemble_inputs)
        produced = self.preprocessor(self.preprocessing.inputs(tensors), request_id)
        tensors.update(self.preprocessing.outputs(produced))
        return self.engine.inputs(tensors)

    @functools.cached_property  # read by every request
    def engine_outputs(self) -> tuple[str, ...]:
        """The engine outputs a request asks Triton for: those the ensemble reads, less the echoes of its inputs and
        the token count."""
        return tuple(name for name in self.engine.output_map if name not in ECHOED_INPUTS and name not in COUNTED_HERE)

    @functools.cached_property
    def token_outputs(self) -> tuple[str, str] | None:
        """The engine outputs that postprocessing reads its tokens and their count from (`output_ids`,
        `sequence_length`): all that a streamed response carries between its first and last."""
        feeding = {ensemble_name: output for output, ensemble_name in self.engine.output_map.items()}
        tokens, length = (feeding.get(self.postprocessing.input_map.get(name)) for name in ("TOKENS_BATCH",
                                                                                            "SEQUENCE_LENGTH"))
        return (tokens, length) if tokens and length else None

    def postprocessor(self, engine_inputs: Tensors, stop_engine: Callable[[str], None]) -> RequestPostprocessing:
        """One request's postprocessing, for the responses to `engine_inputs` (asked for with `engine_outputs`)."""
        return RequestPostprocessing(self, engine_inputs, stop_engine)


class RequestPostprocessing:
    """The postprocessing step of one request run in the adapter, on its engine responses as they arrive.

    `__call__` takes a response's tensors to the ensemble's outputs, as the ensemble would. `text` takes only the new
    token ids of a response that carries nothing else (`PipelineSteps.token_outputs`), the engine's streamed
    responses between its first and last: the same step without a tensor built or read at every token, whose
    numpy calls cost ~0.2 ms of each token's CPU with the caches cold between tokens."""

    def __init__(self, steps: PipelineSteps, engine_inputs: Tensors, stop_engine: Callable[[str], None]):
        self._steps = steps
        self._postprocess = Postprocessor(steps.preprocessor.tokenizer, stop_engine)
        self._echoes = {output: engine_inputs[name] for output, name in ECHOED_INPUTS.items() if name in engine_inputs}
        context = scalar(steps.postprocessing.inputs(steps.engine.outputs(self._echoes)), "REQUEST_CONTEXT")
        self._request = self._postprocess.request(context)  # the state that both entry points share
        self.prompt_tokens: int | None = scalar(self._echoes, "num_input_tokens")

    def __call__(self, engine_outputs: Tensors) -> Tensors:
        steps = self._steps
        ensemble_tensors = steps.engine.outputs({**self._echoes, **engine_outputs})
        return steps.postprocessing.outputs(self._postprocess(steps.postprocessing.inputs(ensemble_tensors)))

    def text(self, token_ids: list[int]) -> str:
        """The text of a streamed response's new tokens."""
        return self._request(token_ids).text
