"""fp32 kernels for the small, frequent parts of a decode step (engine/csrc), in place of ATen calls whose cost
there is mostly dispatch: RMSNorm (optionally added to a residual), one-query-per-row attention over the KV
cache, and the gated MLP's activation. On the 2-core test machine at 16 rows: RMSNorm 30 -> 21 us a call (most
of it now Python and ctypes; a 512-row prefill's 343 -> ~25 us); attention of 16 rows over ~130 keys 474 us with
SDPA and masks, 239 us in a first kernel, 134 us with the group's scores and output slices held in registers;
GELU-tanh and product 100 -> 45 us (512 rows: 2.6 -> 0.5 ms). A decode step of the default model with the first
three: 100.9 -> 87.0 ms at 16 rows, 31.1 -> 25.6 ms at one (interleaved in one process).
(`ENGINE_NATIVE_KERNELS` also switches the vocabulary screen's own int8 kernel: vocab_screen.py.)

`enabled()` is False without a C compiler, AVX2 or FMA, or with `ENGINE_NATIVE_KERNELS=0`; the model then
keeps its ATen paths. The wrappers check every shape, dtype and stride: the kernels trust their pointers.
"""

import ctypes
import functools
import os

import torch

from . import native

_f32, _i32, _i64, _ptr = ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _attention():
    return native.function("decode_attention", _i32,
                           [_ptr, _i64, _i32, _i32, _i32, _i32, _ptr, _ptr, _i32, _ptr, _i32, _f32, _ptr])


@functools.cache
def _rms_norm():
    return native.function("rms_norm", None, [_ptr, _i64, _i32, _i32, _i32, _ptr, _i32, _f32, _ptr, _ptr, _ptr, _ptr])


@functools.cache
def _gated_activation():
    return native.function("gated_activation", None, [_ptr, _i32, _i32, _i32, _ptr])


MAX_ATTENTION_GROUP = 8  # query heads per KV head that decode_attention takes (MAX_GROUP in its source)
GATED_ACTIVATIONS = {"gelu_pytorch_tanh": 0, "silu": 1}  # hidden_act -> the kernel's `act`


@functools.cache
def enabled() -> bool:
    """Read once per process (tests that change ENGINE_NATIVE_KERNELS clear the cache)."""
    return os.environ.get("ENGINE_NATIVE_KERNELS", "1") != "0" and None not in (
        _attention(), _rms_norm(), _gated_activation()
    )


def _check_f32(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32, got {t.dtype}")


def _as_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`x [..., dim]` as `[rows, heads, dim]` with contiguous heads and evenly spaced rows, copied only where
    its strides do not allow that view."""
    dim = x.shape[-1]
    if x.stride(-1) == 1 and (heads == 1 or x.stride(-2) == dim):
        try:
            return x.view(-1, heads, dim)
        except RuntimeError:  # leading dims that do not flatten into one stride
            pass
    return x.contiguous().view(-1, heads, dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`residual + x / sqrt(mean(x**2, -1) + eps) * weight` (no residual: none added), a new contiguous tensor
    of x's shape. `x` may be a slice of heads (`[..., heads, dim]` with contiguous heads), and `weight` one per
    head (`[heads, dim]`) or one for all (`[dim]`), or None: no norm. `rope = (cos, sin)`, each `[..., dim]`
    for x's leading dims (every token's rotary table at its position), then rotates each vector (RoPE)."""
    dim = x.shape[-1]
    _check_f32(x=x)
    per_head = weight is not None and weight.dim() == 2
    if weight is not None:
        _check_f32(weight=weight)
        if weight.shape != ((x.shape[-2], dim) if per_head else (dim,)) or not weight.is_contiguous():
            raise ValueError(f"rms_norm weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    # rows of heads: one rotary table per row (a token) and one weight per head
    rows = _as_rows(x, x.shape[-2] if x.dim() >= 3 and (per_head or rope is not None) else 1)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if residual is not None:
        _check_f32(residual=residual)
        if residual.shape != x.shape or not residual.is_contiguous():
            raise ValueError(f"rms_norm residual {tuple(residual.shape)} for x {tuple(x.shape)}")
    cos = sin = None
    if rope is not None:
        cos, sin = (t.contiguous() for t in rope)
        _check_f32(cos=cos, sin=sin)
        if dim % 2 or cos.shape != sin.shape or cos.numel() != rows.shape[0] * dim:
            raise ValueError(f"rope tables {tuple(cos.shape)} for x {tuple(x.shape)}")
    if out.numel():
        _rms_norm()(
            rows.data_ptr(), rows.stride(0), rows.shape[0], rows.shape[1], dim,
            None if weight is None else weight.data_ptr(), per_head, eps,
            None if residual is None else residual.data_ptr(), out.data_ptr(),
            None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
        )
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     window: int, scale: float) -> torch.Tensor:
    """Attention of `q [n, heads, dim]` (row i: one query per head at `positions[i]`) over cache slot i's keys
    `positions[i] - window < key <= positions[i]` (window 0: from key 0); caches `[slots, kv_heads, len, dim]`.
    Returns `[n, heads, dim]`."""
    n, heads, dim = q.shape
    slots, kv_heads, length, cache_dim = k_cache.shape
    _check_f32(q=q, k_cache=k_cache, v_cache=v_cache)
    if (q.stride(-1) != 1 or q.stride(-2) != dim or cache_dim != dim or v_cache.shape != k_cache.shape
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or n > slots or heads % kv_heads
            or heads // kv_heads > MAX_ATTENTION_GROUP):
        raise ValueError(f"decode attention of q {tuple(q.shape)} over caches {tuple(k_cache.shape)}")
    positions = positions.to(torch.int64).contiguous()
    if positions.shape != (n,):
        raise ValueError(f"decode attention needs {n} positions, got {tuple(positions.shape)}")
    out = torch.empty(n, heads, dim)
    if n == 0:
        return out
    status = _attention()(
        q.data_ptr(), q.stride(0), n, heads, kv_heads, dim, k_cache.data_ptr(), v_cache.data_ptr(), length,
        positions.data_ptr(), window, scale, out.data_ptr(),
    )
    if status:
        raise ValueError(f"decode attention failed ({status}): positions must lie in 0..{length - 1}")
    return out


def gated_activation(gate_up: torch.Tensor, hidden_act: str) -> torch.Tensor:
    """`act(gate) * up` for `gate_up = [..., gate | up]` (a fused gate/up projection's output), `hidden_act` one of
    GATED_ACTIVATIONS. Returns `[..., d]`."""
    _check_f32(gate_up=gate_up)
    d = gate_up.shape[-1] // 2
    if gate_up.shape[-1] != 2 * d or hidden_act not in GATED_ACTIVATIONS:
        raise ValueError(f"gated {hidden_act} of {tuple(gate_up.shape)}")
    rows = gate_up.contiguous().view(-1, 2 * d)
    out = torch.empty(*gate_up.shape[:-1], d)
    if out.numel():
        _gated_activation()(rows.data_ptr(), rows.shape[0], d, GATED_ACTIVATIONS[hidden_act], out.data_ptr())
    return out
