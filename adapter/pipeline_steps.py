"""The ensemble's preprocessing and postprocessing steps, run in the adapter around a stream from its engine step.

Through Triton's ensemble every streamed response crosses Triton twice more (engine, postprocessing, client): at
one stream that hop costs ~1.4 ms of CPU per token on the cores the engine computes on (`bench.stack_layers`).
vLLM's and NIM's front ends tokenize and detokenize in the API process for the same reason. Here the wiring is the
served ensemble's own, read from Triton's config of it, and the steps are the code its models run
(`pipeline.preprocess`, `pipeline.postprocess`), so a request gets what the ensemble would give it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.postprocess import Postprocessor
from pipeline.preprocess import Preprocessor
from pipeline.tensors import Tensors

PREPROCESSING, POSTPROCESSING = "preprocessing", "postprocessing"


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

    def postprocessor(self, stop_engine: Callable[[str], None]) -> Callable[[Tensors], Tensors]:
        """One request's postprocessing: an engine response's outputs in, the ensemble's outputs out."""
        postprocess = Postprocessor(self.preprocessor.tokenizer, stop_engine)

        def run(engine_outputs: Tensors) -> Tensors:
            ensemble_tensors = self.engine.outputs(engine_outputs)
            return self.postprocessing.outputs(postprocess(self.postprocessing.inputs(ensemble_tensors)))

        return run
