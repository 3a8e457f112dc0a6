"""Render `model_repository/` templates into a Triton model repository for one target.

The same templates serve both targets: `cpu` runs our engine under Triton's Python backend, `gpu` runs a
TensorRT-LLM engine under the `tensorrtllm` backend. Only the engine step's backend and parameters differ.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble")
log = logging.getLogger("build.repository")


@dataclass(frozen=True)
class RepositorySettings:
    target: str  # "cpu" or "gpu"
    model_dir: Path  # Hugging Face checkpoint folder: tokenizer (both targets) and weights (cpu)
    max_seq_len: int = 4096
    max_batch_size: int = 16  # sequences decoded together by the engine
    max_queue_size: int = 64  # requests waiting for a slot before the engine answers "full"
    dtype: str = "float32"
    num_threads: int = 0  # 0: torch's default (one per core of cpu_cores when given)
    cpu_cores: str = ""  # cpu: the engine's own cores as a CPU list ("0-3"; launcher/cpu_cores.py); "": any
    stream_interval: int = 0  # engine steps between streamed responses (TensorRT-LLM's); 0: auto on cpu, 1 on gpu
    kv_cache_reuse: bool = True  # cpu: prompts skip the prefill of what a cache slot already holds
    engine_kind: str = "cpu"  # "synthetic": no model, tokens instantly; for benchmarking the stack only
    engine_dir: Path | None = None  # gpu: the built TensorRT-LLM engine
    triton_max_batch_size: int = 64
    preprocessing_instance_count: int = 1

    def engine_parameters(self) -> dict[str, str]:
        if self.target == "cpu":
            return {
                "model_dir": str(self.model_dir),
                "max_batch_size": str(self.max_batch_size),
                "max_seq_len": str(self.max_seq_len),
                "max_queue_size": str(self.max_queue_size),
                "dtype": self.dtype,
                "num_threads": str(self.num_threads),
                "cpu_cores": self.cpu_cores,
                "stream_interval": str(self.stream_interval),
                "enable_kv_cache_reuse": str(self.kv_cache_reuse).lower(),  # TensorRT-LLM's parameter name
                "engine_kind": self.engine_kind,
            }
        if self.target == "gpu":
            if self.engine_dir is None:
                raise ValueError("the gpu target needs engine_dir: a TensorRT-LLM engine folder")
            return {
                "gpt_model_path": str(self.engine_dir),
                "batching_strategy": "inflight_fused_batching",
                "max_beam_width": "1",
                "max_tokens_in_paged_kv_cache": str(self.max_seq_len * self.max_batch_size),
                "kv_cache_free_gpu_mem_fraction": "0.9",
                "exclude_input_in_output": "true",
                "enable_chunked_context": "true",
                "stream_interval": str(self.stream_interval or 1),  # TensorRT-LLM has no auto
            }
        raise ValueError(f"unknown target {self.target!r}: use 'cpu' or 'gpu'")

    def substitutions(self) -> dict[str, str]:
        parameters = "\n".join(
            f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in self.engine_parameters().items()
        )
        return {
            "target": self.target,
            "engine_backend": "python" if self.target == "cpu" else "tensorrtllm",
            "engine_instance_kind": "KIND_CPU",
            "engine_parameters": parameters,
            "tokenizer_dir": str(self.model_dir),
            "max_seq_len": str(self.max_seq_len),
            "triton_max_batch_size": str(self.triton_max_batch_size),
            "preprocessing_instance_count": str(self.preprocessing_instance_count),
        }


def render_repository(settings: RepositorySettings, output: Path) -> Path:
    """Write a ready-to-serve model repository to `output` (replacing what was there)."""
    substitutions = settings.substitutions()
    if output.exists():
        shutil.rmtree(output)
    for model in MODELS:
        source, target = TEMPLATES / model, output / model
        (target / "1").mkdir(parents=True)
        config = Template((source / "config.pbtxt.tmpl").read_text()).substitute(substitutions)
        (target / "config.pbtxt").write_text(config)
        python_shell = source / "1" / "model.py"
        # The gpu engine step is TensorRT-LLM's own backend: it has no Python shell.
        if python_shell.exists() and not (model == "tensorrt_llm" and settings.target == "gpu"):
            shutil.copy2(python_shell, target / "1" / "model.py")
    log.info("rendered %s model repository at %s", settings.target, output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--engine-dir", type=Path)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = RepositorySettings(
        target=args.target,
        model_dir=args.model_dir.resolve(),
        engine_dir=args.engine_dir,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
    )
    render_repository(settings, args.output)


if __name__ == "__main__":
    main()
