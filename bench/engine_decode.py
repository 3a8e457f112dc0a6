"""Decode tokens/s of the CPU engine (in-process) at 1 and 16 concurrent requests, next to transformers'
`generate` on the same checkpoint and dtype, measured in the same run.

    .venv/bin/python -m bench.engine_decode [--model-dir DIR] [--new-tokens 64] [--concurrency 1 16]
                                            [--temperature 0]

Decode rate = new tokens / (time to last token - time to first token), summed over requests, so prefill is
left out on both sides; end-to-end tokens/s is printed too. Greedy by default; `--temperature 1` samples on
both sides (rows that sample need the whole output layer, which greedy rows mostly skip).
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import torch

PROMPT = "The capital of France is"


def transformers_generate(model_dir: Path, dtype: torch.dtype, batch: int, new_tokens: int, temperature: float) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    inputs = tokenizer([PROMPT] * batch, return_tensors="pt", padding=True)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else {}
    common = {"do_sample": False, **sampling, "pad_token_id": 0}
    common.update(min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    with torch.inference_mode():
        model.generate(**inputs, **dict(common, min_new_tokens=2, max_new_tokens=2))  # warm-up
        start = time.perf_counter()
        model.generate(**inputs, **dict(common, min_new_tokens=1, max_new_tokens=1))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(**inputs, **common)
        total = time.perf_counter() - start
    decoded = batch * (new_tokens - 1)
    return {"decode_tok_s": decoded / (total - prefill), "e2e_tok_s": batch * new_tokens / total}


def engine_run(engine, prompt_ids: list[int], concurrency: int, new_tokens: int, temperature: float = 0.0) -> dict:
    from engine import SamplingParams

    first, last, done = {}, {}, threading.Event()

    def on_output(output, i):  # runs on the engine thread: record, never block
        now = time.perf_counter()
        first.setdefault(i, now)
        if output.finished:
            last[i] = now
            if len(last) == concurrency:
                done.set()

    start = time.perf_counter()
    for i in range(concurrency):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=i, streaming=True)
        engine.submit(f"bench-{start}-{i}", prompt_ids, params, lambda o, i=i: on_output(o, i))
    done.wait()
    total = time.perf_counter() - start
    decode_time = max(last.values()) - min(first.values())
    return {"decode_tok_s": concurrency * (new_tokens - 1) / decode_time, "e2e_tok_s": concurrency * new_tokens / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from build.default_model import ensure_default_model
    from engine import Engine
    from tokenization.tokenizer import Tokenizer

    model_dir = (args.model_dir or ensure_default_model()).resolve()
    dtype = getattr(torch, args.dtype)
    prompt_ids = Tokenizer.from_dir(model_dir).encode(PROMPT)
    rows = []
    engine = Engine(model_dir, max_batch_size=max(args.concurrency), dtype=dtype)
    try:
        engine_run(engine, prompt_ids, 2, 4)  # warm-up
        for n in args.concurrency:
            result = engine_run(engine, prompt_ids, n, args.new_tokens, args.temperature)
            rows.append({"concurrency": n, "engine": result})
    finally:
        engine.close()
    for row in rows:
        row["transformers_generate"] = transformers_generate(
            model_dir, dtype, row["concurrency"], args.new_tokens, args.temperature
        )

    decoding = f"temperature {args.temperature:g}" if args.temperature else "greedy"
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{decoding}, {args.new_tokens} new tokens, prompt {len(prompt_ids)} tokens")
    print("| concurrency | engine decode tok/s | transformers generate tok/s | ratio | engine e2e tok/s |")
    print("|---|---|---|---|---|")
    for row in rows:
        ours, theirs = row["engine"], row["transformers_generate"]
        print(f"| {row['concurrency']} | {ours['decode_tok_s']:.1f} | {theirs['decode_tok_s']:.1f} | "
              f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x | {ours['e2e_tok_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
