"""Engine tests on tiny random-weight checkpoints, with transformers as the reference."""

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import Engine, GenerationOutput, PromptTooLongError, QueueFullError, SamplingParams, stream_due
from engine import int8_weights, native, sampling
from engine.config import FULL, SLIDING, ModelConfig
from engine.model import Decoder, sliding_attention
from engine.generate import generate
from tests.engine_checkpoints import ARCHITECTURES, make_tiny_checkpoint

VOCAB = 1024
EOS = 1
# Gemma's sliding window is 8: the longer prompts and all generations run past it.
PROMPT_LENGTHS = (3, 8, 13, 30)


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_ckpt")
    return {arch: make_tiny_checkpoint(arch, root / arch, vocab_size=VOCAB) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def int8_checkpoints(tmp_path_factory):
    """Block-quantized projections with their int8 form: the engine runs them through the int8 kernel."""
    root = tmp_path_factory.mktemp("engine_ckpt_int8")
    return {arch: make_tiny_checkpoint(arch, root / arch, vocab_size=VOCAB, int8=True) for arch in ARCHITECTURES}


@contextlib.contextmanager
def running_engines(checkpoints):
    # stream_interval 1: every step's token is seen (auto coalesces beyond 4 running streams)
    started = {arch: Engine(path, max_batch_size=8, max_seq_len=128, stream_interval=1)
               for arch, path in checkpoints.items()}
    yield started
    for e in started.values():
        e.close()


@pytest.fixture(scope="session")
def engines(checkpoints):
    with running_engines(checkpoints) as started:
        yield started


@pytest.fixture(scope="session")
def int8_engines(int8_checkpoints):
    with running_engines(int8_checkpoints) as started:
        yield started


@pytest.fixture(scope="session")
def gemma(engines):
    return engines["gemma3"]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def submit_all(engine, jobs) -> dict[str, GenerationOutput]:
    """Submit (id, prompt, params) jobs at once; wait for all and return the merged outputs by id."""
    results, parts, lock, done = {}, {}, threading.Lock(), threading.Event()

    def callback(out: GenerationOutput):
        with lock:
            parts.setdefault(out.request_id, []).append(out)
            if out.finished:
                results[out.request_id] = parts[out.request_id]
                if len(results) == len(jobs):
                    done.set()

    for rid, ids, params in jobs:
        engine.submit(rid, ids, params, callback)
    assert done.wait(60)
    return {rid: merge(outs) for rid, outs in results.items()}


def merge(outs: list[GenerationOutput]) -> GenerationOutput:
    last = outs[-1]
    last.token_ids = [t for o in outs for t in o.token_ids]
    return last


# ---- correctness against transformers -------------------------------------------------------------


def checkpoints_and_engines(request, weights: str):
    """The tiny checkpoints and their engines, plain ("fp32") or with int8 forms run by the int8 kernel."""
    checkpoints = request.getfixturevalue("int8_checkpoints" if weights == "int8" else "checkpoints")
    engines = request.getfixturevalue("int8_engines" if weights == "int8" else "engines")
    if weights == "int8":  # a comparison must not pass on the fp32 path by accident
        if not native.cpu_supported():
            pytest.skip("the int8 kernel needs AVX2 and FMA")
        for engine in engines.values():
            assert isinstance(engine.model.layers[0].qkv_w, int8_weights.Int8Linear)
            assert isinstance(engine.model.lm_head_int8, int8_weights.Int8Linear)
    return checkpoints, engines


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(arch, weights, request):
    checkpoints, engines = checkpoints_and_engines(request, weights)
    model = hf_model(checkpoints[arch])
    n = 24
    jobs = [(f"{arch}-{L}", prompt(L, seed=L), greedy(n, end_ids={EOS})) for L in PROMPT_LENGTHS]
    outputs = submit_all(engines[arch], jobs)
    for rid, ids, _ in jobs:
        with torch.inference_mode():
            ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=EOS)
        assert outputs[rid].token_ids == ref[0, len(ids) :].tolist(), rid


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_log_probs_match_reference(weights, request):
    # log probabilities need the full logits: the int8 output layer on the int8 checkpoint
    checkpoints, engines = checkpoints_and_engines(request, weights)
    model = hf_model(checkpoints["gemma3"])
    ids = prompt(13, seed=5)
    out = generate(engines["gemma3"], ids, greedy(10, return_log_probs=True, top_logprobs=3))
    with torch.inference_mode():
        ref = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=10, eos_token_id=None,
            output_logits=True, return_dict_in_generate=True,
        )
    ref_lp = torch.log_softmax(torch.stack(ref.logits)[:, 0].float(), dim=-1)
    assert out.token_ids == ref.sequences[0, len(ids) :].tolist()
    chosen = ref_lp[torch.arange(10), torch.tensor(out.token_ids)]
    assert all(lp <= 0 for lp in out.log_probs)
    torch.testing.assert_close(torch.tensor(out.log_probs), chosen, atol=1e-4, rtol=0)
    assert out.cum_log_prob == pytest.approx(sum(out.log_probs), abs=1e-4)
    for step, top in enumerate(out.top_logprobs):
        values, top_ids = torch.topk(ref_lp[step], 3)
        assert [t for t, _ in top] == top_ids.tolist()
        assert top[0][0] == out.token_ids[step]  # greedy picks the best alternative
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=0)


# ---- batching independence ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_prefill_matches_one_prompt_at_a_time(arch, checkpoints):
    model = Decoder.from_dir(checkpoints[arch])
    model.allocate_cache(6, 64)
    prompts = [torch.tensor(prompt(L, seed=L)) for L in (3, 13, 30)]  # 13 and 30 exceed Gemma's window
    with torch.inference_mode():
        packed = model.logits(model.prefill([0, 1, 2], prompts)).clone()
        alone = torch.stack([model.logits(model.prefill([3 + i], [p]))[0].clone() for i, p in enumerate(prompts)])
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
        for k, v in zip(model.k_cache, model.v_cache):
            torch.testing.assert_close(k[:3], k[3:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[:3], v[3:], atol=1e-5, rtol=1e-5)
        lengths = torch.tensor([len(p) for p in prompts] * 2)
        step = model.logits(model.decode(packed.argmax(-1).repeat(2), lengths))
        torch.testing.assert_close(step[:3], step[3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_after_a_cached_prefix_matches_prefilling_the_whole_prompt(arch, weights, request):
    checkpoints, _ = checkpoints_and_engines(request, weights)
    model = Decoder.from_dir(checkpoints[arch])
    model.allocate_cache(4, 64)
    whole = torch.tensor(prompt(30, seed=3))  # past Gemma's window of 8 on both sides of the split
    with torch.inference_mode():
        reference = model.logits(model.prefill([0], [whole])).clone()
        model.prefill([1], [whole[:20]])
        continued = model.logits(model.prefill([1], [whole[20:]], [20])).clone()
        model.copy_cache_prefix(1, 2, 25)  # slot 2: only the first 25 positions, packed with a whole prompt
        packed = model.logits(model.prefill([3, 2], [whole, whole[25:]], [0, 25])).clone()
    torch.testing.assert_close(continued, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, reference.expand(2, -1), atol=1e-5, rtol=1e-5)
    for cache in (*model.k_cache, *model.v_cache):
        for slot in (1, 2, 3):
            torch.testing.assert_close(cache[slot, :, :30], cache[0, :, :30], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("queries, first_query, first_key, window", [
    (300, 0, 0, 128),  # a whole prompt, past the window: queries in blocks of 128, each over its reach
    (300, 0, 0, 8),
    (37, 200, 0, 64),  # after a cached prefix, its keys in the cache from position 0
    (37, 200, 150, 64),  # the same with the keys from 150 on only
    (5, 3, 0, 512),  # inside the window
])
def test_sliding_attention_by_blocks_matches_one_masked_product(queries, first_query, first_key, window):
    gen = torch.Generator().manual_seed(queries + window)
    q = torch.randn(1, 4, queries, 16, generator=gen)
    k, v = (torch.randn(1, 2, first_query + queries - first_key, 16, generator=gen) for _ in range(2))
    query_pos = torch.arange(first_query, first_query + queries)[:, None]
    key_pos = torch.arange(first_key, first_query + queries)[None, :]
    band = (key_pos <= query_pos) & (key_pos > query_pos - window)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=0.25,
                                                                 enable_gqa=True)
    out = sliding_attention(q, k, v, first_query, first_key, window, 0.25)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def staggered(engine, jobs, join_after: int = 3) -> dict[str, GenerationOutput]:
    """Run jobs so that job i+1 is submitted from job i's callback after `join_after` tokens each,
    so requests join a running batch at different decode steps."""
    results, parts, lock, done = {}, {}, threading.Lock(), threading.Event()
    seen = {}

    def callback(out: GenerationOutput):
        with lock:
            parts.setdefault(out.request_id, []).append(out)
            seen[out.request_id] = seen.get(out.request_id, 0) + len(out.token_ids)
            index = next(i for i, job in enumerate(jobs) if job[0] == out.request_id)
            nxt = index + 1
            if nxt < len(jobs) and jobs[nxt][0] not in parts and (seen[out.request_id] >= join_after or out.finished):
                parts[jobs[nxt][0]] = []
                engine.submit(*jobs[nxt], callback)
            if out.finished:
                results[out.request_id] = merge(parts[out.request_id])
                if len(results) == len(jobs):
                    done.set()

    parts[jobs[0][0]] = []
    engine.submit(*jobs[0], callback)
    assert done.wait(60)
    return results


@pytest.mark.parametrize("mode", ["greedy", "sampled", "plain-sampled"])
def test_batch_neighbours_do_not_change_results(gemma, mode):
    def params(i):
        if mode == "greedy":
            return greedy(12 + 3 * i)
        if mode == "plain-sampled":  # drawn for the whole batch at once
            return SamplingParams(max_new_tokens=12 + 3 * i, temperature=0.7 + 0.1 * i, seed=100 + i)
        return SamplingParams(
            max_new_tokens=12 + 3 * i, temperature=0.9, top_k=100, top_p=0.95, seed=100 + i,
            repetition_penalty=1.1 if i % 2 else 1.0, frequency_penalty=0.2 * (i % 3),
        )

    jobs = [(f"{mode}-{i}", prompt(L, seed=i), params(i)) for i, L in enumerate((5, 30, 9, 14, 2, 21))]
    alone = {rid: generate(gemma, ids, p).token_ids for rid, ids, p in jobs}
    together = staggered(gemma, jobs)
    assert {rid: o.token_ids for rid, o in together.items()} == alone


# ---- sampling parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1024, 4096 + 64, 1000])  # 512-, 64- and 8-token blocks (the last: plain argmax)
def test_fast_argmax_matches_torch_including_ties(vocab):
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab))
    top = logits.max() + 1
    logits[1, [7, vocab - 3]] = top  # tie across blocks
    logits[2, [vocab - 2, vocab - 1]] = top  # tie within the last block
    logits[3] = 0.0  # all equal
    assert torch.equal(sampling.argmax(logits), logits.argmax(-1))
    assert sampling.argmax(logits).tolist()[1:4] == [7, vocab - 2, 0]


@pytest.mark.parametrize("vocab", [2048, 1000])  # 512-token blocks, and one block of the whole row
def test_batched_sampling_draws_from_the_softmax_and_never_a_masked_token(vocab):
    g = torch.Generator().manual_seed(vocab)
    row = torch.randn(vocab, generator=g)
    row[vocab // 3 :] = float("-inf")  # masked tokens, whole blocks of them included
    row[5] += 6.0  # a likely token, so its frequency is measured precisely
    draws = 20000
    tokens = sampling.sample(row.expand(draws, -1).contiguous(), torch.rand(draws, dtype=torch.float64, generator=g))
    assert int(tokens.max()) < vocab // 3
    frequency = torch.bincount(tokens, minlength=vocab).double() / draws
    probability = row.double().softmax(-1)
    # within 5 binomial standard deviations for every token
    assert ((frequency - probability).abs() <= 5 * (probability * (1 - probability) / draws).sqrt() + 1e-4).all()


def hf_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper on one row."""
    sorted_logits, order = torch.sort(logits)
    drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[-1] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked: the nucleus is among the candidates; flat: it is not
def test_top_p_keeps_the_same_tokens_as_transformers(scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    for top_p in (0.05, 0.5, 0.9, 0.99):
        row = torch.randn(2 * sampling.NUCLEUS_CANDIDATES, generator=g) * scale
        assert torch.equal(sampling.nucleus(row, top_p).isinf(), hf_top_p(row, top_p).isinf())


def test_batched_sampling_rows_do_not_depend_on_their_neighbours():
    logits = torch.randn(6, 4096, generator=torch.Generator().manual_seed(0))
    uniforms = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    together = sampling.sample(logits, uniforms)
    alone = torch.cat([sampling.sample(logits[i : i + 1], uniforms[i : i + 1]) for i in range(6)])
    assert torch.equal(together, alone)


def test_seed_reproducibility(gemma):
    ids = prompt(10, seed=1)

    def run(seed):
        return generate(gemma, ids, SamplingParams(max_new_tokens=16, seed=seed)).token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_greedy_equivalents(gemma):
    ids = prompt(10, seed=2)
    ref = generate(gemma, ids, greedy(16)).token_ids
    assert generate(gemma, ids, SamplingParams(max_new_tokens=16, top_k=1, seed=3)).token_ids == ref
    assert generate(gemma, ids, SamplingParams(max_new_tokens=16, top_p=1e-6, seed=3)).token_ids == ref
    assert generate(gemma, ids, SamplingParams(max_new_tokens=16, min_p=1.0, seed=3)).token_ids == ref


def test_bad_words_never_appear(gemma):
    ids = prompt(13, seed=3)
    ref = generate(gemma, ids, greedy(20)).token_ids
    banned = ref[0]
    out = generate(gemma, ids, greedy(20, bad_words=[[banned]])).token_ids
    assert banned not in out
    # two-token bad word: its second token may not follow its first
    # pick a pair that first occurs at generated position i, so the output diverges exactly there
    seq = ids + ref
    pairs = list(zip(seq, seq[1:]))
    i = next(i for i in range(1, len(ref)) if pairs[len(ids) + i - 1] not in pairs[: len(ids) + i - 1])
    first, second = ref[i - 1], ref[i]
    out = generate(gemma, ids, greedy(20, bad_words=[[first, second]])).token_ids
    full = ids + out
    assert all((full[j - 1], full[j]) != (first, second) for j in range(len(ids), len(full)))
    assert out[:i] == ref[:i] and out[i] != second


def test_stop_words_and_end_ids(gemma):
    ids = prompt(30, seed=4)
    ref = generate(gemma, ids, greedy(20)).token_ids
    word = ref[5:7]
    out = generate(gemma, ids, greedy(20, stop_words=[[9999 % VOCAB, 3], word]))
    end = next(i + 2 for i in range(len(ref) - 1) if ref[i : i + 2] == word)
    assert out.token_ids == ref[:end]
    assert (out.finish_reason, out.stop_reason) == ("stop", word)

    end_id = ref[6]
    out = generate(gemma, ids, greedy(20, end_ids={end_id}))
    assert out.token_ids == ref[: ref.index(end_id) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", end_id)

    out = generate(gemma, ids, greedy(20))
    assert (out.finish_reason, out.stop_reason, out.num_output_tokens) == ("length", None, 20)


def test_min_tokens_suppresses_end_id(gemma):
    ids = prompt(10, seed=2)
    ref = generate(gemma, ids, greedy(16)).token_ids
    end_id = ref[0]
    assert generate(gemma, ids, greedy(16, end_ids={end_id})).token_ids == [end_id]
    out = generate(gemma, ids, greedy(16, end_ids={end_id}, min_tokens=4))
    assert end_id not in out.token_ids[:4] and len(out.token_ids) >= 4


def test_min_tokens_without_end_ids_keeps_the_batched_greedy_path():
    # What benchmark clients send (aiperf: ignore_eos with min_tokens): nothing for min_tokens to mask, so the
    # rows stay on the batched greedy path (the vocabulary screen) instead of the per-row one.
    assert sampling.plain_greedy(greedy(16, min_tokens=16), 0)
    assert not sampling.plain_greedy(greedy(16, end_ids={1}, min_tokens=16), 0)
    assert sampling.plain_greedy(greedy(16, end_ids={1}, min_tokens=16), 16)


def test_logit_bias_forces_token(gemma):
    out = generate(gemma, prompt(10), SamplingParams(max_new_tokens=8, seed=1, logit_bias={42: 100.0}))
    assert out.token_ids == [42] * 8


def test_penalties_change_output(gemma):
    ids = prompt(20, seed=6)
    ref = generate(gemma, ids, greedy(24)).token_ids
    most = max(ref.count(t) for t in set(ref))
    assert most > 2  # the tiny model repeats itself, which the penalties should reduce
    rep = generate(gemma, ids, greedy(24, repetition_penalty=3.0)).token_ids
    freq = generate(gemma, ids, greedy(24, frequency_penalty=2.0)).token_ids
    pres = generate(gemma, ids, greedy(24, presence_penalty=5.0)).token_ids
    for out in (rep, freq, pres):
        assert out != ref
        assert max(out.count(t) for t in set(out)) < most
    assert len(set(pres)) == len(pres)  # a large presence penalty forbids any repeat here


def test_non_streaming_single_callback(gemma):
    outs = []
    done = threading.Event()

    def callback(out):
        outs.append(out)
        if out.finished:
            done.set()

    gemma.submit("non-streaming", prompt(6), greedy(7, streaming=False, return_log_probs=True), callback)
    assert done.wait(30)
    assert len(outs) == 1 and len(outs[0].token_ids) == 7 and len(outs[0].log_probs) == 7
    assert outs[0].num_input_tokens == 6 and outs[0].num_output_tokens == 7


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1), dict(min_p=2.0),
        dict(repetition_penalty=0.0), dict(seed=-1), dict(top_logprobs=99), dict(bad_words=[[]]),
        dict(stop_words=[[VOCAB]]), dict(logit_bias={-1: 1.0}), dict(temperature=float("nan")),
    ],
)
def test_invalid_params_rejected(gemma, bad):
    params = SamplingParams(**{"max_new_tokens": 4, **bad})
    with pytest.raises(ValueError):
        gemma.submit("bad", prompt(4), params, lambda out: None)


# ---- request lifecycle -----------------------------------------------------------------------------


@pytest.fixture
def small_engine(checkpoints):
    engine = Engine(checkpoints["llama"], max_batch_size=2, max_seq_len=64, max_queue_size=2)
    yield engine
    engine.close()


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_cancel_frees_slot(small_engine):
    outs = []
    started = threading.Event()

    def callback(out):
        outs.append(out)
        started.set()

    small_engine.submit("long", prompt(5), SamplingParams(max_new_tokens=50, seed=0), callback)
    assert started.wait(10)
    assert small_engine.cancel("long")
    wait_for(lambda: outs[-1].finished)
    assert outs[-1].finish_reason == "cancelled" and outs[-1].num_output_tokens < 50
    assert small_engine.stats()["free_slots"] == 2 and small_engine.stats()["running"] == 0
    assert not small_engine.cancel("long")
    assert generate(small_engine, prompt(5), greedy(5)).num_output_tokens == 5


def test_queue_full_and_duplicate_ids(small_engine):
    release = threading.Event()

    def blocking(out):  # holds the engine thread, so nothing else gets admitted
        release.wait(10)

    small_engine.submit("a", prompt(3), greedy(40), blocking)
    wait_for(lambda: small_engine.stats()["running"] == 1)
    with pytest.raises(ValueError, match="already in use"):
        small_engine.submit("a", prompt(3), greedy(4), lambda out: None)
    small_engine.submit("b", prompt(3), greedy(4), lambda out: None)
    small_engine.submit("c", prompt(3), greedy(4), lambda out: None)
    assert small_engine.stats()["waiting"] == 2
    with pytest.raises(QueueFullError):
        small_engine.submit("d", prompt(3), greedy(4), lambda out: None)
    for rid in "abc":
        assert small_engine.cancel(rid)
    release.set()
    wait_for(lambda: small_engine.stats()["free_slots"] == 2 and small_engine.stats()["waiting"] == 0)


def test_prompt_too_long_names_lengths(small_engine):
    with pytest.raises(PromptTooLongError) as info:
        small_engine.submit("x", prompt(60), greedy(10), lambda out: None)
    message = str(info.value)
    assert "maximum context length is 64 tokens" in message and "70 tokens (60 in the prompt, 10 for" in message


def test_callback_exception_cancels_only_that_request(small_engine):
    final = []

    def bad(out):
        if not out.finished:
            raise RuntimeError("client went away")
        final.append(out)

    small_engine.submit("bad", prompt(4), greedy(30), bad)
    good = generate(small_engine, prompt(7), greedy(12))
    assert good.finish_reason == "length" and good.num_output_tokens == 12
    wait_for(lambda: final)
    assert final[0].finish_reason == "cancelled"
    wait_for(lambda: small_engine.stats()["free_slots"] == 2)


def test_step_exception_fails_requests_and_loop_survives(small_engine, monkeypatch):
    decode = small_engine.model.decode

    def broken(*args, **kwargs):
        monkeypatch.setattr(small_engine.model, "decode", decode)
        raise RuntimeError("boom")

    monkeypatch.setattr(small_engine.model, "decode", broken)
    out = generate(small_engine, prompt(4), greedy(5))
    assert out.finish_reason == "error" and "boom" in out.error
    assert generate(small_engine, prompt(4), greedy(5)).finish_reason == "length"


def test_length_limit_reached_at_max_seq_len(small_engine):
    out = generate(small_engine, prompt(54), greedy(10))
    assert out.finish_reason == "length" and out.num_output_tokens == 10


# ---- KV cache reuse ---------------------------------------------------------------------------------


def reused(engine) -> int:
    return engine.stats()["reused_prompt_tokens"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_chats_next_turns_reuse_the_cache_and_give_the_tokens_of_a_whole_prefill(arch, checkpoints):
    with Engine(checkpoints[arch], max_batch_size=2, max_seq_len=128) as engine, \
            Engine(checkpoints[arch], max_batch_size=2, max_seq_len=128, kv_cache_reuse=False) as plain:
        turn = prompt(30, seed=1)
        answer = generate(engine, turn, greedy(10)).token_ids
        assert answer == generate(plain, turn, greedy(10)).token_ids and reused(engine) == 0
        for i in range(2):
            turn = turn + answer + prompt(5, seed=10 + i)
            before = reused(engine)
            answer = generate(engine, turn, greedy(10)).token_ids
            # all of the previous turn but its last token, which was generated and never fed back
            assert reused(engine) - before == len(turn) - 5 - 1
            assert answer == generate(plain, turn, greedy(10)).token_ids
            # Another conversation takes slot 0: this one's cache moves to the free slot 1 first, and the next
            # turn copies it back.
            generate(engine, prompt(20, seed=20 + i), greedy(3))
        assert reused(plain) == 0


def test_concurrent_prompts_share_a_running_requests_prefix_and_idle_slots_keep_theirs(gemma):
    system = prompt(24, seed=5)
    jobs = [(f"shared-{i}", system + prompt(4 + i, seed=30 + i), greedy(8 + 2 * i)) for i in range(4)]
    alone = {rid: generate(gemma, ids, p).token_ids for rid, ids, p in jobs}
    before = reused(gemma)
    together = staggered(gemma, jobs)  # each joins while the previous one runs
    assert {rid: o.token_ids for rid, o in together.items()} == alone
    assert reused(gemma) - before >= 4 * len(system)


def test_a_free_slot_that_rides_along_in_decode_steps_reuses_only_what_they_left_intact(checkpoints):
    # Free slots below a running one ride along in its decode steps and write a row at its position: slot 0
    # keeps only its first ~10 positions of the 42 it held.
    with Engine(checkpoints["gemma3"], max_batch_size=3, max_seq_len=128, stream_interval=1) as engine, \
            Engine(checkpoints["gemma3"], max_batch_size=3, max_seq_len=128, kv_cache_reuse=False) as plain:
        first, other, long = prompt(40, seed=7), prompt(6, seed=8), prompt(6, seed=9)
        lock, outputs, finished = threading.Lock(), {}, set()

        def on_output(output):
            with lock:
                outputs.setdefault(output.request_id, []).extend(output.token_ids)
                if output.finished:
                    finished.add(output.request_id)

        def long_tokens():
            with lock:
                return len(outputs.get("long", []))

        for rid, ids, n in (("first", first, 3), ("other", other, 2), ("long", long, 60)):
            engine.submit(rid, ids, greedy(n), on_output)
        wait_for(lambda: "first" in finished)
        seen = long_tokens()
        wait_for(lambda: long_tokens() >= seen + 2)  # decode steps in which slot 0 rode along idle
        follow_up = first + outputs["first"] + prompt(4, seed=11)
        out = generate(engine, follow_up, greedy(6))
        assert "long" not in finished, "the long request must still be running"
        assert 0 < reused(engine) < len(first) + len(outputs["first"]) - 1
        assert out.token_ids == generate(plain, follow_up, greedy(6)).token_ids


# ---- config parsing --------------------------------------------------------------------------------


def test_gemma3_legacy_config_fields():
    cfg = ModelConfig.from_dict(
        {
            "architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "query_pre_attn_scalar": 16, "sliding_window": 4, "sliding_window_pattern": 3,
            "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }
    )
    assert cfg.layer_types == (SLIDING, SLIDING, FULL) * 2
    assert cfg.rope[FULL].theta == 1e6 and cfg.rope[FULL].factor == 8.0
    assert cfg.rope[SLIDING].theta == 1e4 and cfg.rope[SLIDING].rope_type == "default"
    assert cfg.attn_scale == 0.25 and cfg.tie_word_embeddings


def test_stream_interval_sends_every_stream_at_the_same_steps(checkpoints, gemma):
    """After its first token, a stream's tokens go out only at engine steps that are multiples of the interval,
    counted for all requests at once (a stream that joins later is sent at the same steps), and the tokens
    are those of an unbatched stream."""
    interval, sent = 4, {"early": [], "late": []}
    jobs = {"early": (prompt(5, seed=1), greedy(23)), "late": (prompt(9, seed=2), greedy(17))}
    engine = Engine(checkpoints["gemma3"], max_batch_size=2, max_seq_len=64, stream_interval=interval)
    done = threading.Semaphore(0)

    def on_output(out: GenerationOutput):  # on the engine thread, so `steps` is the step that sends it
        sent[out.request_id].append((engine.stats()["steps"], out))
        if out.request_id == "early" and out.num_output_tokens == 2:
            engine.submit("late", *jobs["late"], on_output)  # joins one step later, off the interval's beat
        if out.finished:
            done.release()

    try:
        engine.submit("early", *jobs["early"], on_output)
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        engine.close()
    for rid, outputs in sent.items():
        (_, first), *middle, (_, last) = outputs
        assert len(first.token_ids) == 1 and last.finished
        assert middle and all(step % interval == 0 for step, _ in middle)
        assert all(len(out.token_ids) == interval for _, out in middle[1:])
        expected = generate(gemma, jobs[rid][0], jobs[rid][1]).token_ids
        assert [t for _, out in outputs for t in out.token_ids] == expected


def test_auto_stream_interval_is_one_step_per_four_running_streams():
    def due_steps(running: int) -> list[int]:
        return [step for step in range(8) if stream_due(step, 2, 0, running)]

    assert due_steps(1) == due_steps(4) == list(range(8))  # few streams: every token at once
    assert due_steps(5) == due_steps(8) == [0, 2, 4, 6]
    assert due_steps(16) == [0, 4]
    assert stream_due(3, 1, 0, 16)  # the first token never waits
    assert due_steps(16) != [step for step in range(8) if stream_due(step, 2, 1, 16)]  # an explicit interval wins
    # a step after a prefill pass sends every stream's tokens, unless the interval was set
    assert all(stream_due(step, 2, 0, 16, after_prefill=True) for step in range(8))
    assert [step for step in range(8) if stream_due(step, 2, 2, 16, after_prefill=True)] == [0, 2, 4, 6]


def test_running_streams_advance_between_the_prefills_of_a_burst(gemma):
    """A burst larger than one prefill pass is prefilled a pass per decode step, not all before the next step."""
    events, done = [], threading.Semaphore(0)
    burst = [(f"burst-{i}", prompt(100, seed=50 + i)) for i in range(7)]  # 700 tokens: two prefill passes

    def on_burst(out: GenerationOutput):
        events.append(out.request_id)
        if out.finished:
            done.release()

    def on_running(out: GenerationOutput):
        events.append("running")
        if out.num_output_tokens == 3:  # on the engine thread: the whole burst waits for the next loop
            for rid, ids in burst:
                gemma.submit(rid, ids, greedy(2), on_burst)
        if out.finished:
            done.release()

    gemma.submit("running", prompt(5), greedy(12), on_running)
    for _ in range(len(burst) + 1):
        assert done.acquire(timeout=60)
    first, last = events.index("burst-0"), events.index("burst-6")
    assert "running" in events[first:last]


@pytest.mark.parametrize("reuse", [True, False])
def test_a_prompt_longer_than_the_prefill_budget_goes_in_chunks_with_the_same_tokens(checkpoints, gemma, monkeypatch,
                                                                                      reuse):
    long = prompt(53, seed=12)  # past Gemma's window of 8 in every chunk
    whole = generate(gemma, long, greedy(8)).token_ids  # one pass (the budget is 512)
    monkeypatch.setattr("engine.engine.PREFILL_TOKENS", 16)
    with Engine(checkpoints["gemma3"], max_batch_size=2, max_seq_len=128, kv_cache_reuse=reuse) as engine:
        passes, prefill = [], engine.model.prefill

        def counted(slots, prompts, starts=None):
            passes.append(([len(p) for p in prompts], starts))
            return prefill(slots, prompts, starts)

        engine.model.prefill = counted
        assert generate(engine, long, greedy(8)).token_ids == whole
    assert passes == [([16], [0]), ([16], [16]), ([16], [32]), ([5], [48])]


def test_a_running_stream_advances_between_the_chunks_of_a_long_prompt(checkpoints, monkeypatch):
    monkeypatch.setattr("engine.engine.PREFILL_TOKENS", 16)
    with Engine(checkpoints["gemma3"], max_batch_size=2, max_seq_len=128, stream_interval=1) as engine:
        events, done = [], threading.Semaphore(0)

        def on_long(out: GenerationOutput):
            events.append("long")
            if out.finished:
                done.release()

        def on_running(out: GenerationOutput):
            events.append("running")
            if out.num_output_tokens == 2:  # on the engine thread: admitted at the next round
                engine.submit("long", prompt(60, seed=13), greedy(2), on_long)
            if out.finished:
                done.release()

        engine.submit("running", prompt(5), greedy(20), on_running)
        for _ in range(2):
            assert done.acquire(timeout=60)
    # 60 prompt tokens in four passes of 16, a decode step of the running stream after each of the first three
    assert events[: events.index("long")].count("running") >= 2 + 3


@pytest.mark.parametrize("setting, policy", [(None, os.SCHED_IDLE), ("0", os.SCHED_OTHER)])
def test_engine_helper_threads_yield_the_cores_to_other_processes(checkpoints, monkeypatch, setting, policy):
    """ENGINE_SCHED_IDLE: the engine thread's helpers (OpenMP's workers, the chunk pool's) run under SCHED_IDLE by
    default, the engine thread itself at normal priority: a waking process takes a helper's core, not its own."""
    if setting is None:
        monkeypatch.delenv("ENGINE_SCHED_IDLE", raising=False)
    else:
        monkeypatch.setenv("ENGINE_SCHED_IDLE", setting)
    before = set(os.listdir("/proc/self/task"))
    with Engine(checkpoints["gemma3"], max_batch_size=1, max_seq_len=64) as engine:
        assert generate(engine, prompt(20), greedy(3)).num_output_tokens == 3
        helpers = set(os.listdir("/proc/self/task")) - before - {str(engine._thread.native_id)}
        assert os.sched_getscheduler(engine._thread.native_id) == os.SCHED_OTHER
        assert all(os.sched_getscheduler(int(tid)) == policy for tid in helpers)
        if torch.get_num_threads() > 1:
            names = [Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in helpers]
            assert "chunk-pool" in names and len(names) >= 2  # and OpenMP's worker


def test_engine_on_cores_of_its_own_computes_only_there(checkpoints):
    """ENGINE_CPU_CORES (launcher/cpu_cores.py): the engine thread and its OpenMP workers stay on the given cores,
    one thread per core; cores this process may not use are refused at construction."""
    cores = frozenset(sorted(os.sched_getaffinity(0))[:1])
    with Engine(checkpoints["gemma3"], max_batch_size=1, max_seq_len=64, cpu_cores=cores) as engine:
        before = set(os.listdir("/proc/self/task"))
        assert generate(engine, prompt(20), greedy(3)).num_output_tokens == 3
        started = set(os.listdir("/proc/self/task")) - before
        assert os.sched_getaffinity(engine._thread.native_id) == cores
        assert all(os.sched_getaffinity(int(tid)) == cores for tid in started)
    with pytest.raises(ValueError, match="cannot run on cores"):
        Engine(checkpoints["gemma3"], max_batch_size=1, max_seq_len=64, cpu_cores=frozenset({4096}))
