"""The int8 screen of the vocabulary projection must give exactly the fp32 argmax, near-ties included."""

import threading

import pytest
import torch

from engine import kernels, vocab_screen
from engine.model import Decoder
from engine.vocab_screen import VocabScreen
from tests.engine_checkpoints import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not vocab_screen.available(), reason="no int8 kernel for the screen here")

VOCAB, HIDDEN = 4096, 96


def outlier_channels(generator) -> torch.Tensor:
    """A final-norm scale like Gemma's: most channels near 1, a few hundreds of times larger."""
    gamma = 1 + torch.rand(HIDDEN, generator=generator)
    gamma[torch.randperm(HIDDEN, generator=generator)[:6]] *= 150
    return gamma


@pytest.fixture(params=["native", "fbgemm"])
def product(request, monkeypatch):
    """Which int8 product the screens built in a test use: csrc/int8_screen.c or fbgemm's."""
    native = request.param == "native"
    monkeypatch.setattr(kernels, "enabled", lambda: native)
    if not (vocab_screen._native() if native else vocab_screen._fbgemm_available()):
        pytest.skip(f"no {request.param} int8 product here")
    return request.param


def screen_of(weight, gamma, product) -> VocabScreen:
    screen = VocabScreen(weight, gamma)
    assert screen.native == (product == "native")
    return screen


def reference(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (h.double() @ weight.double().T).argmax(-1)


def hidden_rows(generator, rows: int, gamma: torch.Tensor) -> torch.Tensor:
    return torch.randn(rows, HIDDEN, generator=generator) * gamma


def test_matches_the_exact_argmax_on_outlier_heavy_rows(product):
    g = torch.Generator().manual_seed(0)
    weight, gamma = torch.randn(VOCAB, HIDDEN, generator=g) * 0.05, outlier_channels(g)
    h = hidden_rows(g, 64, gamma)
    assert torch.equal(screen_of(weight, gamma, product).argmax(h), reference(h, weight))


def test_our_int8_product_equals_fbgemms_bit_for_bit(monkeypatch):
    monkeypatch.setattr(kernels, "enabled", lambda: True)
    if not (vocab_screen._native() and vocab_screen._fbgemm_available()):
        pytest.skip("needs both int8 products")
    g = torch.Generator().manual_seed(3)
    weight, gamma = torch.randn(VOCAB, HIDDEN, generator=g) * 0.05, outlier_channels(g)
    h = hidden_rows(g, 7, gamma)  # a last tile of 3 rows
    scores = {}
    for product in ("native", "fbgemm"):
        monkeypatch.setattr(kernels, "enabled", lambda: product == "native")
        screen = screen_of(weight, gamma, product)
        x, _, levels = screen._quantize(h)
        scores[product] = screen._scores(x, levels).clone()
    assert torch.equal(scores["native"], scores["fbgemm"])


def test_near_ties_far_below_the_int8_step_are_resolved_exactly(product):
    # Groups of 64 rows that differ by 1e-4 relative, ~80x below the weights' int8 step (and ~100x above fp32
    # rounding): int8 scores cannot order them; the winner is decided by the fp32 rescoring.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(VOCAB // 64, HIDDEN, generator=g) * 0.05
    weight = base.repeat_interleave(64, 0) * (1 + 1e-4 * torch.randn(VOCAB, 1, generator=g))
    gamma = outlier_channels(g)
    h = hidden_rows(g, 32, gamma)
    screen = screen_of(weight, gamma, product)
    expected = reference(h, weight)
    x, _, levels = screen._quantize(h)
    int8_scores = screen._scores(x, levels)
    assert not torch.equal(int8_scores.argmax(-1), expected)  # the int8 scores alone get some rows wrong
    assert torch.equal(screen.argmax(h), expected)


def test_a_row_gets_the_same_token_alone_and_in_any_batch(product):
    g = torch.Generator().manual_seed(2)
    weight, gamma = torch.randn(VOCAB, HIDDEN, generator=g) * 0.05, outlier_channels(g)
    h = hidden_rows(g, 16, gamma)
    screen = screen_of(weight, gamma, product)
    alone = torch.cat([screen.argmax(h[i : i + 1]) for i in range(16)])
    assert torch.equal(screen.argmax(h), alone)


def test_decoder_greedy_equals_the_logits_argmax_with_and_without_the_screen(tmp_path, monkeypatch):
    checkpoint = make_tiny_checkpoint("gemma3", tmp_path / "gemma3", vocab_size=1024)
    model = Decoder.from_dir(checkpoint)
    assert model.screen is not None
    model.allocate_cache(4, 64)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1024, (n,), generator=g) for n in (3, 9, 17, 30)]
    with torch.inference_mode():
        hidden = model.prefill([0, 1, 2, 3], prompts)
        expected = model.logits(hidden).argmax(-1)
        assert torch.equal(model.greedy(hidden), expected)
        # Past the candidate cap the screen gives up and the full product decides.
        monkeypatch.setattr(vocab_screen, "_MAX_CANDIDATES", 0)
        assert model.screen.argmax(hidden) is None
        assert torch.equal(model.greedy(hidden), expected)


@pytest.mark.slow
def test_default_model_generates_the_same_tokens_with_and_without_the_screen(default_model_dir):
    from tokenizers import Tokenizer

    from engine import Engine, SamplingParams
    from engine.generate import generate

    tokenizer = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    ",
        "Ingredients for a chocolate cake:",
        "1, 1, 2, 3, 5, 8,",
        "東京は",
        "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
    ]
    ids = [[2] + tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    params = SamplingParams(max_new_tokens=48, temperature=0.0)  # no end ids: all 48 tokens
    outputs = {}
    for screened in (True, False):
        model = Decoder.from_dir(default_model_dir, screen_vocab=screened)
        assert (model.screen is not None) == screened
        with Engine.from_model(model, max_batch_size=len(prompts), max_seq_len=128) as engine:
            # All prompts at once: the screened run decodes them as one batch.
            results = {}
            threads = [
                threading.Thread(target=lambda i=i: results.__setitem__(i, generate(engine, ids[i], params).token_ids))
                for i in range(len(ids))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        outputs[screened] = [results[i] for i in range(len(ids))]
    assert outputs[True] == outputs[False]
