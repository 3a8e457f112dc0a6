"""Tiny random-weight Hugging Face checkpoints for engine tests (built at test time with transformers)."""

from pathlib import Path

import torch

# Small shapes shared by all architectures: GQA (4 query heads, 2 kv heads), short context.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    # Larger than the HF default (0.02) so the random model has peaked, varied next-token distributions.
    initializer_range=0.1,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)

ARCHITECTURES = ("gemma3", "llama", "qwen2")


def _build(arch: str, vocab_size: int, overrides: dict):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    kwargs = {**_COMMON, "vocab_size": vocab_size}
    if arch == "gemma3":
        kwargs.update(
            sliding_window=8,  # smaller than test prompts, so the window matters
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            tie_word_embeddings=True,
        )
        kwargs.update(overrides)
        return Gemma3ForCausalLM(Gemma3TextConfig(**kwargs))
    if arch == "llama":
        kwargs.update(rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, tie_word_embeddings=False)
        kwargs.update(overrides)
        return LlamaForCausalLM(LlamaConfig(**kwargs))
    if arch == "qwen2":
        kwargs.update(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=True)
        kwargs.update(overrides)
        return Qwen2ForCausalLM(Qwen2Config(**kwargs))
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


def _block_quantize(weight: torch.Tensor, group: int, asymmetric: bool):
    """`(q, scale, offset)` of `weight` in GGUF's style: per group of inputs, half-precision scale (and minimum)."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // group, group)
    if asymmetric:  # 4 bits above a minimum, like Q4_K
        offset = blocks.amin(-1).half().float()
        scale = ((blocks.amax(-1) - offset) / 15).half().float().clamp(min=1e-4)
        q = ((blocks - offset[..., None]) / scale[..., None]).round().clamp(0, 15)
    else:  # 6 bits around zero, like Q6_K
        offset = None
        scale = (blocks.abs().amax(-1) / 31).half().float().clamp(min=1e-4)
        q = (blocks / scale[..., None]).round().clamp(-32, 31)
    return q.reshape(n, k).to(torch.int8), scale, offset


def _save_int8_forms(model, path: Path) -> None:
    """Replace the output layer's and each projection's weight by block-quantized ones and write their int8
    form beside the checkpoint, so that transformers and the engine's int8 kernel compute with the same
    weights. The groups differ per projection (v: 16, o: with minima), so fused weights mix them."""
    from engine import int8_weights
    from engine.int8_weights import rebuild

    forms = {}
    output = model.get_output_embeddings()  # tied models: the token embedding too
    form = _block_quantize(output.weight.data, 32, False)
    with torch.no_grad():
        output.weight.copy_(rebuild(*form))
    tied = model.config.tie_word_embeddings
    forms["model.embed_tokens.weight" if tied else "lm_head.weight"] = form
    for i, layer in enumerate(model.model.layers):
        for prefix, module in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for proj_name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                proj = getattr(module, proj_name, None)
                if proj is None:
                    continue
                form = _block_quantize(proj.weight.data, 16 if proj_name == "v_proj" else 32, proj_name == "o_proj")
                with torch.no_grad():
                    proj.weight.copy_(rebuild(*form))
                forms[f"model.layers.{i}.{prefix}.{proj_name}.weight"] = form
    int8_weights.save(path, forms)


def make_tiny_checkpoint(
    arch: str, path: Path, vocab_size: int = 1024, seed: int = 0, int8: bool = False, **overrides
) -> Path:
    """Save a random-weight `arch` model ("gemma3", "llama" or "qwen2") to `path` and return it.

    The folder holds only config.json, generation_config.json and model.safetensors (no tokenizer); with
    `int8`, block-quantized projections and their int8 form too. `overrides` go to the transformers config.
    """
    path = Path(path)
    torch.manual_seed(seed)
    model = _build(arch, vocab_size, overrides)
    if int8:
        _save_int8_forms(model, path)
    if arch == "qwen2":
        # HF initialises biases to zero; random biases exercise the engine's bias path.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path
