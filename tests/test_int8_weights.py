"""The int8 block weights: GGUF decoding against gguf's own dequantization, and the kernel against fp32 matmul."""

import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from build.gguf_int8 import decode
from engine import int8_weights, native
from engine.int8_weights import Int8Linear, rebuild

pytestmark = pytest.mark.skipif(
    not native.cpu_supported(), reason="the int8 kernel needs AVX2 and FMA"
)


def block_weight(n, k, group, asymmetric, seed=0):
    """(q, scale, offset) with half-precision scales, as GGUF stores them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0 if asymmetric else -32, 16 if asymmetric else 32, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=g) * 0.02).half().float()
    offset = -(torch.rand(n, k // group, generator=g) * 0.1).half().float() if asymmetric else None
    return q, scale, offset


def test_the_kernel_is_built_here():
    assert int8_weights.enabled(), "no C compiler? the engine would fall back to fp32 weights"


@pytest.mark.parametrize("group, asymmetric", [(32, False), (16, False), (32, True)])
def test_the_kernel_rebuilds_each_weight_bit_for_bit(group, asymmetric):
    # x = identity rows: every output is one product 1 * w plus exact zeros, so y must equal W.T exactly;
    # 1-4 rows at a time take the direct path, 96 the buffered one
    q, scale, offset = block_weight(48, 96, group, asymmetric)
    weight, linear, eye = rebuild(q, scale, offset), Int8Linear(q, scale, offset), torch.eye(96)
    assert torch.equal(linear(eye), weight.T)
    for rows in (1, 2, 3, 4):
        assert torch.equal(torch.cat([linear(part) for part in eye.split(rows)]), weight.T)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 6, 7, 13, 300])  # 1-4 rows take the direct path
@pytest.mark.parametrize("k_in", [96, 672])  # not multiples of the kernel's 128-input chunks
@pytest.mark.parametrize("group, asymmetric", [(32, True), (16, False), (1, True)])  # 1: odd, one row chains alike
def test_the_kernel_matches_fp32_matmul(rows, k_in, group, asymmetric):
    q, scale, offset = block_weight(64, k_in, group, asymmetric, seed=rows)
    x = torch.randn(rows, k_in, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ rebuild(q, scale, offset).double().T
    torch.testing.assert_close(Int8Linear(q, scale, offset)(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_one_row_products_from_more_threads_than_cores_each_come_out_whole():
    # A one-row product is a chunk_loop (csrc/chunk_pool.c) over the calling thread's own helpers. With more
    # callers than cores, helpers are preempted mid-chunk and their chunks computed again by the caller: every
    # chunk must still land once, whole, in its own product; and a caller's helpers must end with it.
    q, scale, offset = block_weight(1024, 640, 32, True)  # 64 blocks: 16 chunks of 4
    linear = Int8Linear(q, scale, offset)
    rows = torch.randn(32, 640, generator=torch.Generator().manual_seed(3))
    expected = [linear(row[None]) for row in rows]
    mismatches, threads_before = [], len(os.listdir("/proc/self/task"))

    def products():
        for _ in range(30):
            for i, row in enumerate(rows):
                if not torch.equal(linear(row[None]), expected[i]):
                    mismatches.append(i)

    callers = [threading.Thread(target=products) for _ in range(2 * (os.cpu_count() or 1) + 2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert not mismatches
    deadline = time.monotonic() + 5  # the OS threads end just after Python's join returns
    while len(os.listdir("/proc/self/task")) > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(os.listdir("/proc/self/task")) <= threads_before


def test_shapes_are_checked_before_the_kernel_sees_pointers():
    linear = Int8Linear(*block_weight(32, 64, 32, False))
    with pytest.raises(ValueError):
        linear(torch.randn(2, 65))
    with pytest.raises(ValueError):
        linear(torch.randn(2, 64), out=torch.empty(1, 32))
    with pytest.raises(ValueError):
        linear(torch.randn(2, 64), out=torch.empty(32, 2).t())


def test_an_int8_form_that_no_longer_matches_its_checkpoint_is_not_used():
    form = block_weight(32, 64, 32, True)
    weight = rebuild(*form)
    assert int8_weights.matches(form, weight)
    changed = weight.clone()
    changed[-1, 0] += 1e-3
    assert not int8_weights.matches(form, changed)
    assert not int8_weights.matches(form, weight[:16])


def test_fused_parts_with_different_groups_equal_the_parts_alone():
    parts = [block_weight(32, 64, 32, False, seed=1), block_weight(16, 64, 16, False, seed=2),
             block_weight(16, 64, 32, True, seed=3)]
    x = torch.randn(3, 64)
    fused = Int8Linear.concat(parts)(x)
    alone = torch.cat([Int8Linear(*p)(x) for p in parts], dim=1)
    torch.testing.assert_close(fused, alone, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_gguf_blocks_decode_to_gguf_dequantization_bit_for_bit(kind):
    import gguf
    from gguf.quants import dequantize

    qtype = gguf.GGMLQuantizationType[kind]
    values, size = gguf.GGML_QUANT_SIZES[qtype]
    n_out, k_in = 16, 512
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (n_out * k_in // values, size), dtype=np.uint8)  # every bit pattern of q
    half = {"Q8_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[kind]  # where the f16 scales sit
    for at in half:  # finite scales: random bytes could make NaN
        scales = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16)
        blocks[:, at : at + 2] = scales.view(np.uint8).reshape(-1, 2)
    data = blocks.reshape(n_out, -1)
    tensor = SimpleNamespace(tensor_type=qtype, shape=np.array([k_in, n_out]), data=data)
    q, scale, offset, _ = decode(tensor)
    ours = rebuild(torch.from_numpy(q), torch.from_numpy(scale), None if offset is None else torch.from_numpy(offset))
    theirs = torch.from_numpy(dequantize(data, qtype).reshape(n_out, k_in).astype(np.float32))
    assert torch.equal(ours, theirs)
