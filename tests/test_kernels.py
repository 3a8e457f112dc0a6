"""The decode step's native kernels against the ATen ops they replace, and the model with and without them."""

import pytest
import torch
import torch.nn.functional as F

from engine import kernels, native
from engine.model import Decoder
from tests.engine_checkpoints import ARCHITECTURES, make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not native.cpu_supported(), reason="the kernels need AVX2 and FMA")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_kernels_are_built_here():
    assert kernels.enabled(), "no C compiler? the engine would keep its ATen paths"


@pytest.mark.parametrize("shape", [(1, 640), (16, 640), (3, 5, 37), (700, 256)])  # 700 x 256: threaded
def test_rms_norm_matches_aten(shape):
    x, weight, residual = randn(*shape), randn(shape[-1], seed=1), randn(*shape, seed=2)
    expected = torch.rms_norm(x, shape[-1:], weight, 1e-6)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-6), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-6, residual), residual + expected, rtol=1e-5,
                               atol=1e-6)


def test_rms_norm_of_head_slices_with_a_weight_per_head():
    # Gemma's q/k norm: the q and k heads of a fused qkv projection, read in place
    qkv = randn(4, 3, 7 * 40)
    qk = qkv[..., : 6 * 40].view(4, 3, 6, 40)
    weight = randn(6, 40, seed=1)
    x = qk.contiguous()
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(kernels.rms_norm(qk, weight, 1e-6), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        kernels.rms_norm(qk, randn(5, 40), 1e-6)


@pytest.mark.parametrize("with_norm", [True, False])  # Gemma's q/k norm, or rotation alone (Llama, Qwen2)
@pytest.mark.parametrize("dim", [40, 256, 18])  # halves of 20 / 128 / 9 floats: vector and scalar paths
def test_norm_and_rope_match_aten(with_norm, dim):
    from engine.model import apply_rope, rope_tables
    from engine.config import RopeConfig

    qkv = randn(2, 5, 7 * dim)
    qk = qkv[..., : 6 * dim].view(2, 5, 6, dim)  # read in place from the fused projection
    weight = randn(6, dim, seed=1) if with_norm else None
    cos, sin = rope_tables(RopeConfig(theta=10000.0), dim, 64, torch.float32)
    positions = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    x = qk.contiguous()
    if with_norm:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    expected = apply_rope(x, cos[positions][:, :, None], sin[positions][:, :, None])
    got = kernels.rms_norm(qk, weight, 1e-6, rope=(cos[positions], sin[positions]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "silu"])
@pytest.mark.parametrize("shape", [(1, 2 * 2048), (16, 2 * 37), (3, 700, 2 * 64)])  # 3 x 700 rows: threaded
def test_gated_activation_matches_aten(hidden_act, shape):
    gate_up = randn(*shape) * 4
    gate_up[0, ..., :5] = torch.tensor([0.0, -100.0, 100.0, -20.0, 1e-30])  # both tails of the exponential
    # Against fp64: ATen's fp32 GELU-tanh rounds its far negative tail to exactly 0 (tanh = -1), ours does not
    gate, up = gate_up.double().chunk(2, dim=-1)
    act = F.silu(gate) if hidden_act == "silu" else F.gelu(gate, approximate="tanh")
    torch.testing.assert_close(kernels.gated_activation(gate_up, hidden_act).double(), act * up, rtol=1e-5, atol=1e-6)


def reference_attention(q, k_cache, v_cache, positions, window, scale):
    n, heads, dim = q.shape
    kv_heads, length = k_cache.shape[1], k_cache.shape[2]
    keys = torch.arange(length)[None, :]
    seen = keys <= positions[:, None]
    if window:
        seen &= keys > positions[:, None] - window
    out = F.scaled_dot_product_attention(
        q.reshape(n, kv_heads, heads // kv_heads, dim).double(), k_cache[:n].double(), v_cache[:n].double(),
        attn_mask=seen[:, None, None, :], scale=scale,
    )
    return out.reshape(n, heads, dim).float()


# Contexts past 64 keys take several blocks of the online softmax.
# Groups of 1 to 8 heads; dims that end on 16 floats, on 8 and on single floats.
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 1, 256), (8, 2, 64), (3, 3, 37), (6, 1, 40), (8, 1, 24)])
@pytest.mark.parametrize("window", [0, 5, 100])
def test_decode_attention_matches_sdpa(heads, kv_heads, dim, window):
    slots, length, n = 6, 300, 5
    k_cache, v_cache = randn(slots, kv_heads, length, dim, seed=1), randn(slots, kv_heads, length, dim, seed=2)
    q = randn(n, heads + kv_heads, dim, seed=3)[:, :heads]  # a slice, as the model passes it
    positions = torch.tensor([0, 1, 63, 64, length - 1])
    got = kernels.decode_attention(q, k_cache, v_cache, positions, window, dim**-0.5)
    torch.testing.assert_close(got, reference_attention(q, k_cache, v_cache, positions, window, dim**-0.5),
                               rtol=1e-5, atol=1e-5)


def test_decode_attention_checks_before_the_kernel_sees_pointers():
    k_cache = torch.zeros(2, 1, 16, 8)
    q = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError):
        kernels.decode_attention(q, k_cache, k_cache, torch.tensor([0, 16]), 0, 1.0)  # past the cache
    with pytest.raises(ValueError):
        kernels.decode_attention(torch.zeros(3, 4, 8), k_cache, k_cache, torch.tensor([0, 1, 2]), 0, 1.0)
    with pytest.raises(ValueError):
        kernels.decode_attention(q.double(), k_cache, k_cache, torch.tensor([0, 1]), 0, 1.0)
    with pytest.raises(ValueError):
        kernels.decode_attention(torch.zeros(2, 4, 16)[..., :8], k_cache, k_cache, torch.tensor([0, 1]), 0, 1.0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_model_decodes_the_same_with_and_without_the_kernels(arch, tmp_path, monkeypatch):
    model = Decoder.from_dir(make_tiny_checkpoint(arch, tmp_path / arch, vocab_size=512))
    model.allocate_cache(3, 64)
    prompts = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 12, 20)]

    def run(native_kernels: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(kernels, "enabled", lambda: native_kernels)
        with torch.inference_mode():
            hidden = [model.prefill([0, 1, 2], prompts)]
            tokens, positions = model.greedy(hidden[0]), torch.tensor([5, 12, 20])
            generated = [tokens]
            for _ in range(20):  # past the tiny Gemma's sliding window of 8
                hidden.append(model.decode(tokens, positions))
                tokens, positions = model.greedy(hidden[-1]), positions + 1
                generated.append(tokens)
        return torch.stack(generated), hidden

    native_tokens, native_hidden = run(True)
    aten_tokens, aten_hidden = run(False)
    assert torch.equal(native_tokens, aten_tokens)
    for a, b in zip(native_hidden, aten_hidden):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_fused_decode_step_gives_the_per_op_steps_hidden_states_to_the_bit(arch, tmp_path):
    model = Decoder.from_dir(make_tiny_checkpoint(arch, tmp_path / arch, vocab_size=512, int8=True))
    model.allocate_cache(3, 64)
    assert model.fused is not None, "int8 projections and the kernels: the fused step applies"
    fused = model.fused
    prompts = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 12, 20)]

    def run(step) -> list[torch.Tensor]:
        model.fused = step
        with torch.inference_mode():
            hidden = [model.prefill([0, 1, 2], prompts)]
            tokens, positions = model.greedy(hidden[0]), torch.tensor([5, 12, 20])
            for _ in range(20):  # past the tiny Gemma's sliding window of 8
                hidden.append(model.decode(tokens, positions))
                tokens, positions = model.greedy(hidden[-1]), positions + 1
        return hidden

    per_op, one_call = run(None), run(fused)
    for a, b in zip(per_op, one_call):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):  # checked before any cache row is written
        fused(torch.zeros(1, model.config.hidden_size), torch.tensor([64]))
