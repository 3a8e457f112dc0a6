"""CPU inference engine for decoder-only LLMs (Gemma 3 text, Llama, Qwen2) in PyTorch.

gpt-fast style: own model code over Hugging Face safetensors checkpoints, a preallocated KV cache with one
static slot per running request, and sampling as pure functions. `Engine` runs in-flight (continuous)
batching on a background thread: `submit()` a prompt with `SamplingParams` and a callback that receives
`GenerationOutput`s; `engine.generate.generate()` is a blocking helper.
"""

from .engine import Engine, GenerationOutput, PromptTooLongError, QueueFullError, stream_due
from .params import SamplingParams

__all__ = ["Engine", "GenerationOutput", "PromptTooLongError", "QueueFullError", "SamplingParams", "stream_due"]
