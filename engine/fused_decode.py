"""A decode step's pass through every layer in one native call (csrc/decode_layers.c), in place of the per-op
path of `Decoder._run`: the same kernels in the same order, so the same hidden states to the bit, without the
~14 Python calls a layer (dispatch, ctypes, tensor allocation) between them. On the 2-core test machine,
the default model's step body, interleaved in one process: 1 row 12.4 -> 7.3 ms, 4 rows 20.4 -> 13.0, 16 rows
47.5 -> 39.7, 32 rows 87.5 -> 77.9; the engine's whole step at 16 streams 83.0 -> 70.0 ms (medians).

It applies where every kernel of that path does: the native kernels built, fp32, every projection in int8 form,
a gated activation the kernel knows and at most `kernels.MAX_ATTENTION_GROUP` query heads per KV head;
`FusedDecode.build` returns None otherwise and the model keeps the per-op path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import int8_weights, kernels, native
from .config import FULL, SLIDING

_ptr = ctypes.c_void_p


class _Projection(ctypes.Structure):
    _fields_ = [("q", _ptr), ("scale", _ptr), ("offset", _ptr), ("bias", _ptr),
                ("n_out", ctypes.c_int), ("k_in", ctypes.c_int), ("group", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("qk_norm", _ptr), ("post_attn_norm", _ptr), ("pre_ff_norm", _ptr),
                ("post_ff_norm", _ptr), ("qkv", _Projection), ("o", _Projection), ("gate_up", _Projection),
                ("down", _Projection), ("k_cache", _ptr), ("v_cache", _ptr), ("sliding", ctypes.c_int)]


class _Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                                                  "max_seq_len", "sliding_window", "gemma", "act")]
    _fields_ += [("eps", ctypes.c_float), ("attn_scale", ctypes.c_float)]


@functools.cache
def _kernel():
    return native.function("decode_layers", ctypes.c_int, [_ptr, _ptr, ctypes.c_int, _ptr, _ptr, _ptr, _ptr],
                           linked=("rms_norm", "int8_linear", "decode_attention", "gated_activation"))


def _address(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"the fused decode step needs contiguous fp32 tensors, got {t.dtype} {tuple(t.shape)}")
    return t.data_ptr()


def _projection(w: int8_weights.Int8Linear, bias: torch.Tensor | None) -> _Projection:
    return _Projection(w.q.data_ptr(), w.scale.data_ptr(), _address(w.offset), _address(bias),
                       w.out_features, w.in_features, w.group)


class FusedDecode:
    """The layers of one model and its KV cache, as the native step reads them. Holds pointers into the model's
    tensors: build it again after `allocate_cache`."""

    def __init__(self, model, slots: int):
        c = model.config
        self._shape = _Shape(len(model.layers), c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                             c.intermediate_size, model.max_seq_len, c.sliding_window or 0, int(c.is_gemma),
                             kernels.GATED_ACTIVATIONS[c.hidden_act], c.rms_norm_eps, c.attn_scale)
        self._layers = (_Layer * len(model.layers))(*(
            _Layer(_address(layer.input_norm), _address(layer.qk_norm), _address(layer.post_attn_norm),
                   _address(layer.pre_ff_norm), _address(layer.post_ff_norm),
                   _projection(layer.qkv_w, layer.qkv_b), _projection(layer.o_w, layer.o_b),
                   _projection(layer.gate_up_w, layer.gate_up_b), _projection(layer.down_w, layer.down_b),
                   _address(model.k_cache[i]), _address(model.v_cache[i]), int(layer.sliding))
            for i, layer in enumerate(model.layers)
        ))
        self._rope = (_ptr * 4)(*(_address(t) for kind in (FULL, SLIDING) for t in model.rope[kind]))
        self._tensors = (model.layers, model.k_cache, model.v_cache, model.rope)  # what the pointers point into
        hd = c.num_heads * c.head_dim
        # per row, as decode_layers.c lays them out: h, qkv, q/k, attention, projection, gate/up, activation, rope
        per_row = (2 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                   + (c.num_heads + c.num_kv_heads) * c.head_dim + hd + 3 * c.intermediate_size + 4 * c.head_dim)
        self._work = torch.empty(slots * per_row)
        self._slots = slots

    @classmethod
    def build(cls, model, slots: int) -> FusedDecode | None:
        c = model.config
        applies = (
            model.native_decode_attention() and _kernel() is not None and c.hidden_act in kernels.GATED_ACTIVATIONS
            and all(isinstance(w, int8_weights.Int8Linear)
                    for layer in model.layers for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w))
        )
        return cls(model, slots) if applies else None

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`x [n, hidden]` (the embedded tokens of cache slots 0..n-1 at `positions`) through every layer, in
        place; returns x."""
        n = x.shape[0]
        positions = positions.to(torch.int64).contiguous()
        if x.shape != (n, self._shape.hidden) or not 0 < n <= self._slots or positions.shape != (n,):
            raise ValueError(f"fused decode of x {tuple(x.shape)} at positions {tuple(positions.shape)}")
        status = _kernel()(ctypes.byref(self._shape), self._layers, n, positions.data_ptr(), self._rope,
                           _address(x), self._work.data_ptr())
        if status == 1:
            raise ValueError(f"fused decode: positions must lie in 0..{self._shape.max_seq_len - 1}")
        if status:
            raise RuntimeError(f"fused decode step failed ({status})")
        return x
