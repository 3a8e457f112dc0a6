"""The default model's linear layers as GGUF stores them: small integers with a scale and an offset per block.

Every weight of the model's attention and MLP projections and of its output layer is, in the GGUF,
`q * a + b` for an integer `q` (5, 8, 4 or 6 bits) and a scale `a` and offset `b` shared by a group of 32 or 16
inputs, and transformers' dequantization computes exactly `fma(q, a, b)` in fp32 (one rounding: with an
offset, `q * a` is exact).
Keeping `q` as int8 with its fp32 `a` and `b` therefore loses nothing against the float32 checkpoint, and
lets the CPU engine read a quarter of the bytes per decode step (engine/int8_weights.py).

`write_int8_weights` writes `int8/weights.safetensors` beside the float32 checkpoint, after checking every
tensor against the float32 weight bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger("build.gguf_int8")

# GGUF tensor name -> Hugging Face name: the output layer (the token embedding when tied), then per layer
_OUTPUT = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _q8_0(blocks):  # d (f16), 32 x int8
    d, qs = blocks[:, :2], blocks[:, 2:]
    return qs.view(np.int8), _f16(d), None, 32


def _q5_0(blocks):  # d (f16), high bits (32 x 1 bit), low nibbles (32 x 4 bits)
    n = blocks.shape[0]
    d, qh, qs = blocks[:, :2], blocks[:, 2:6], blocks[:, 6:]
    high = (np.ascontiguousarray(qh).view(np.uint32).reshape(n, 1) >> np.arange(32, dtype=np.uint32)) & 1
    low = (qs.reshape(n, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 0x0F
    q = (low.reshape(n, 32) | (high.astype(np.uint8) << 4)).astype(np.int8) - np.int8(16)
    return q, _f16(d), None, 32


def _q4_k(blocks):  # super-block of 256: d, dmin (f16), 8 x (6-bit scale, 6-bit min), 256 x 4 bits
    from gguf.quants import Q4_K

    n = blocks.shape[0]
    d, dmin, scales, qs = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), blocks[:, 4:16], blocks[:, 16:]
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(scales))
    low_high = (qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    return low_high.reshape(n, 256).astype(np.int8), d * sc.astype(np.float32), -(dmin * m.astype(np.float32)), 32


def _q6_k(blocks):  # super-block of 256: low nibbles, high 2 bits, 16 x int8 scale, d (f16)
    n = blocks.shape[0]
    ql, qh, scales, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], blocks[:, 208:]
    low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = (low.reshape(n, 2, 4, 32) | (high.reshape(n, 2, 4, 32) << 4)).astype(np.int8) - np.int8(32)
    return q.reshape(n, 256), _f16(d) * np.ascontiguousarray(scales).view(np.int8).astype(np.float32), None, 16


_DECODERS = {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def decode(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int] | None:
    """`(q [N, K] int8, scale [N, K / G], offset [N, K / G] or None, G)` of a GGUF tensor, None for other types."""
    decoder = _DECODERS.get(tensor.tensor_type.name)
    if decoder is None:
        return None
    k_in, n_out = (int(x) for x in tensor.shape)
    block_values = 32 if tensor.tensor_type.name in ("Q8_0", "Q5_0") else 256
    blocks = np.asarray(tensor.data).reshape(n_out * (k_in // block_values), -1)
    q, scale, offset, group = decoder(blocks)
    q = q.reshape(n_out, k_in)
    scale = scale.reshape(n_out, k_in // group)
    offset = None if offset is None else offset.reshape(n_out, k_in // group)
    return q, scale, offset, group


def write_int8_weights(gguf_path: Path, checkpoint_dir: Path) -> Path:
    """Write the checkpoint's int8 file (engine/int8_weights.py) from the GGUF's projections. Raises if any
    differs from the float32 weight."""
    import gguf
    import torch
    from safetensors import safe_open

    from engine import int8_weights

    forms = {}
    with safe_open(str(checkpoint_dir / "model.safetensors"), framework="pt") as checkpoint:
        for tensor in gguf.GGUFReader(str(gguf_path)).tensors:
            parts = tensor.name.split(".")
            if tensor.name in _OUTPUT:
                name = _OUTPUT[tensor.name]
            elif len(parts) == 4 and parts[0] == "blk" and parts[2] in _LINEARS:
                name = f"model.layers.{parts[1]}.{_LINEARS[parts[2]]}.weight"
            else:
                continue
            decoded = decode(tensor)
            if decoded is None:
                logger.info("%s is %s: kept as float32 only", tensor.name, tensor.tensor_type.name)
                continue
            q, scale, offset, group = decoded
            q, scale = torch.from_numpy(q), torch.from_numpy(scale)
            offset = None if offset is None else torch.from_numpy(offset)
            if not torch.equal(int8_weights.rebuild(q, scale, offset), checkpoint.get_tensor(name)):
                raise RuntimeError(f"{tensor.name} ({tensor.tensor_type.name}) does not rebuild {name} exactly")
            forms[name] = q, scale, offset
    target = int8_weights.save(checkpoint_dir, forms)
    megabytes = target.stat().st_size / 1e6
    logger.info("int8 weights: %d matrices, %.0f MB, equal to the float32 ones", len(forms), megabytes)
    return target
