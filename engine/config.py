"""Model configuration read from a Hugging Face checkpoint folder's config.json."""

import json
from dataclasses import dataclass
from pathlib import Path

FULL = "full_attention"
SLIDING = "sliding_attention"

# architectures[0] or model_type -> our family name
_FAMILIES = {
    "Gemma3ForCausalLM": "gemma3",
    "gemma3_text": "gemma3",
    "LlamaForCausalLM": "llama",
    "llama": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "qwen2": "qwen2",
}


@dataclass(frozen=True)
class RopeConfig:
    """One rotary embedding: base theta plus optional HF `rope_type` scaling ("default", "linear", "llama3")."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "gemma3" | "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    attn_scale: float
    layer_types: tuple[str, ...]
    sliding_window: int | None
    rope: dict  # layer type -> RopeConfig
    final_logit_softcapping: float | None
    eos_token_ids: tuple[int, ...]

    @property
    def is_gemma(self) -> bool:
        return self.family == "gemma3"

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> "ModelConfig":
        with open(Path(checkpoint_dir) / "config.json") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        arch = (cfg.get("architectures") or [None])[0]
        family = _FAMILIES.get(arch) or _FAMILIES.get(cfg.get("model_type"))
        if family is None:
            raise ValueError(
                f"unsupported model: architectures={cfg.get('architectures')}, model_type={cfg.get('model_type')}"
            )
        num_layers = cfg["num_hidden_layers"]
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        gemma = family == "gemma3"
        if gemma and cfg.get("attn_logit_softcapping") is not None:
            raise ValueError("attn_logit_softcapping is not supported (SDPA has no softcap)")

        layer_types = cfg.get("layer_types")
        if layer_types is None:
            if gemma:
                pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
                layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
            elif family == "qwen2" and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
                first = cfg.get("max_window_layers", num_layers)
                layer_types = [SLIDING if i >= first else FULL for i in range(num_layers)]
            else:
                layer_types = [FULL] * num_layers
        # Qwen2 keeps sliding_window in config.json even when use_sliding_window is false.
        sliding_window = cfg.get("sliding_window") if SLIDING in layer_types else None
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding_window, layer_types = None, [FULL] * num_layers

        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
            qkv_bias=True if family == "qwen2" else bool(cfg.get("attention_bias", False)),
            o_bias=False if family == "qwen2" else bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            attn_scale=(cfg.get("query_pre_attn_scalar", 256) if gemma else head_dim) ** -0.5,
            layer_types=tuple(layer_types),
            sliding_window=sliding_window,
            rope=_rope_configs(cfg, family),
            final_logit_softcapping=cfg.get("final_logit_softcapping") if gemma else None,
            eos_token_ids=eos,
        )


def _rope_configs(cfg: dict, family: str) -> dict:
    """Per layer type RoPE, from transformers 5.x `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if family == "gemma3":
        if params and FULL in params:
            full, local = dict(params[FULL] or {}), dict(params.get(SLIDING) or {})
        else:
            # 4.x layout: rope_scaling applies to global (full attention) layers only
            full = {"rope_theta": cfg.get("rope_theta", 1_000_000.0), **(scaling or {})}
            local = {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
        full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
        return {FULL: _rope(full, cfg), SLIDING: _rope(local, cfg)}
    single = dict(params) if params else {"rope_theta": cfg.get("rope_theta", 10_000.0), **(scaling or {})}
    single.setdefault("rope_theta", cfg.get("rope_theta", 10_000.0))
    rope = _rope(single, cfg)
    return {FULL: rope, SLIDING: rope}


def _rope(p: dict, cfg: dict) -> RopeConfig:
    rope_type = p.get("rope_type") or p.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor is not supported")
    return RopeConfig(
        theta=float(p["rope_theta"]),
        rope_type=rope_type,
        factor=float(p.get("factor", 1.0)),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            p.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 8192)
        ),
    )
