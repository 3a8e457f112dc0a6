"""Linear layers whose fp32 weights are block-quantized values, kept as int8 and rebuilt exactly on the fly.

A weight `W[n, k] = fma(q[n, k], scale[n, k // G], offset[n, k // G])` with int8 `q` (GGUF's Q8_0, Q5_0,
Q4_K and Q6_K formats, which the default model uses: see build/gguf_int8.py) takes a quarter of the fp32
bytes. `csrc/int8_linear.c` rebuilds the weights in fp32 in registers or cache and multiplies them there, so
the result is the fp32 product with the very same weights, summed in another order (as any other BLAS
would). On the 2-core test machine the default model's body linears take 10 / 12 / 32 ms for 1 / 4 / 16 rows
(oneDNN's fp32 product: 26 / 25 / 40 ms; prefills of 512-2,048 rows are 10-12% slower than oneDNN), and its
262k-token output layer, which sampled rows need whole, 12 / 19 / 52 ms (fp32: 29 / 53 / 68 ms).

A checkpoint carries them in `int8/weights.safetensors`: `<name>.int8`, `<name>.int8_scale` and, for formats
with a minimum, `<name>.int8_offset`, for a `<name>` of the fp32 checkpoint. The kernel is compiled at first
use (engine/native.py); without a compiler, AVX2 or FMA, or with `ENGINE_INT8_WEIGHTS=0`, the engine uses
the fp32 weights instead.
"""

import ctypes
import functools
import os
from pathlib import Path

import torch

from . import native

FILE = Path("int8") / "weights.safetensors"
_ROWS_PER_BLOCK = 16  # output rows per packed block (NB in the kernel)
_CHUNK = 128  # inputs rebuilt at a time (KC in the kernel): groups must divide it


def enabled() -> bool:
    return os.environ.get("ENGINE_INT8_WEIGHTS", "1") != "0" and _kernel() is not None


@functools.cache
def _kernel():
    i32, ptr = ctypes.c_int, ctypes.c_void_p
    return native.function("int8_linear", i32, [ptr, i32, i32, i32, i32, ptr, ptr, ptr, ptr])


class Int8Linear:
    """A `[out_features, in_features]` weight as int8 values with an fp32 scale and offset per group of inputs."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None):
        n, k = q.shape
        groups = scale.shape[1]
        if (q.dtype != torch.int8 or n % _ROWS_PER_BLOCK or k % groups or _CHUNK % (k // groups)
                or scale.shape[0] != n or (offset is not None and offset.shape != scale.shape)):
            raise ValueError(f"cannot pack an int8 weight {tuple(q.shape)} with scales {tuple(scale.shape)}")
        self.out_features, self.in_features, self.group = n, k, k // groups
        blocks = n // _ROWS_PER_BLOCK
        # [blocks, K, 16]: each kernel step reads 16 outputs' values of one input from one cache line
        self.q = q.view(blocks, _ROWS_PER_BLOCK, k).transpose(1, 2).contiguous()
        self.scale, self.offset = (
            None if t is None else t.float().view(blocks, _ROWS_PER_BLOCK, groups).transpose(1, 2).contiguous()
            for t in (scale, offset)
        )  # offset None: all zeros (symmetric formats), not stored

    @classmethod
    def concat(cls, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> "Int8Linear":
        """One weight of `(q, scale, offset)` parts stacked along the outputs (fused q/k/v, gate/up); parts with
        larger groups repeat their scales down to the smallest group. ValueError when the kernel cannot take it."""
        k = parts[0][0].shape[1]
        groups = max(scale.shape[1] for _, scale, _ in parts)
        q, scales, offsets = [], [], []
        for part_q, scale, offset in parts:
            if part_q.shape[1] != k or groups % scale.shape[1] or scale.shape[0] != part_q.shape[0] or (
                offset is not None and offset.shape != scale.shape
            ):
                raise ValueError("parts of a fused weight need the same inputs, nested groups and matching scales")
            repeat = groups // scale.shape[1]
            q.append(part_q)
            scales.append(scale.repeat_interleave(repeat, 1))
            offsets.append(None if offset is None else offset.repeat_interleave(repeat, 1))
        if all(o is None for o in offsets):
            return cls(torch.cat(q), torch.cat(scales), None)
        offsets = [torch.zeros_like(s) if o is None else o for s, o in zip(scales, offsets)]
        return cls(torch.cat(q), torch.cat(scales), torch.cat(offsets))

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`x [rows, in_features]` (fp32) @ W.T, into `out` when given (contiguous `[rows, out_features]`)."""
        # The kernel trusts its pointers: every shape is checked here.
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"int8 linear of {self.in_features} inputs given x {tuple(x.shape)}")
        x = x.to(torch.float32).contiguous()
        shape = (x.shape[0], self.out_features)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"int8 linear output must be contiguous fp32 {shape}, got {tuple(out.shape)} {out.dtype}")
        if x.shape[0] == 0:
            return out
        offset = None if self.offset is None else self.offset.data_ptr()
        status = _kernel()(
            x.data_ptr(), x.shape[0], self.in_features, self.out_features, self.group,
            self.q.data_ptr(), self.scale.data_ptr(), offset, out.data_ptr(),
        )
        if status:
            raise RuntimeError(f"int8_linear failed ({status}) for x {tuple(x.shape)}")
        return out


def rebuild(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """The fp32 weight `q * scale + offset`, rounded once as GGUF's dequantization rounds it (where there is an
    offset the product is exact), which is what the kernel's fused multiply-add gives."""
    group = q.shape[1] // scale.shape[1]
    weight = q.float() * scale.repeat_interleave(group, 1)
    return weight if offset is None else weight + offset.repeat_interleave(group, 1)


def matches(form: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], weight: torch.Tensor) -> bool:
    """Whether an int8 form is `weight` (spot-checked on its first and last rows): an int8 file left beside
    a checkpoint that has since changed must not override it."""
    q, scale, offset = form
    if q.dtype != torch.int8 or q.shape != weight.shape or scale.shape[0] != q.shape[0]:
        return False
    rows = [0, q.shape[0] - 1]
    part = (q[rows], scale[rows], None if offset is None else offset[rows])
    return torch.equal(rebuild(*part), weight[rows].to(torch.float32))


def save(checkpoint_dir: Path, forms: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> Path:
    """Write `{fp32 weight name: (q, scale, offset or None)}` as the checkpoint's int8 file."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (q, scale, offset) in forms.items():
        tensors[name + ".int8"] = q.contiguous()
        tensors[name + ".int8_scale"] = scale.contiguous()
        if offset is not None:
            tensors[name + ".int8_offset"] = offset.contiguous()
    path = Path(checkpoint_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def load(checkpoint_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """`{fp32 weight name: (q, scale, offset)}` from a checkpoint's int8 file; empty without one or the kernel."""
    path = Path(checkpoint_dir) / FILE
    if not path.exists() or not enabled():
        return {}
    from safetensors.torch import load_file

    tensors = load_file(path)
    return {
        name[: -len(".int8")]: (q, tensors[name + "_scale"], tensors.get(name + "_offset"))
        for name, q in tensors.items()
        if name.endswith(".int8")
    }
