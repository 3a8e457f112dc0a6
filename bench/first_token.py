"""What the serving stack adds to a first token, without the model's noise: the SYNTHETIC engine
(bench/synthetic_engine.py, tokens instantly) behind Triton and the adapter, one-token requests one at a time.

    .venv/bin/python -m bench.first_token [--requests 200] [--passes 5] [--output-tokens 1 --step-ms 0]

Each pass sends --requests streaming requests (128-token prompts, 1 output token) to the synthetic engine
in-process (the floor), through gRPC to Triton's `tensorrt_llm` model, and through the adapter's OpenAI API,
in turn; a request's time is from sending it to its first token. A one-token request's first token is also its
last response; with `--output-tokens 2 --step-ms 19` the first token comes alone and the second a model's step
later, as the first of the load's 128 tokens does. With a real model the same hops sit on either
side of the prefill, whose ±50 ms run to run on this machine hide a few milliseconds (`bench.stack_layers
--output-tokens 1`). Reported: each path's median over passes of the per-pass median, what it adds to the
in-process floor, and each process's CPU per request. Writes bench/results/first_token.md and .json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

from bench.serve_load import Prompts, bench_cache, in_process_load, run_level, write_results
from bench.stack_layers import grpc_level, stack_cpu
from bench.sse import run_clients

PROMPT_TOKENS = 128
PARTS = ("client", "adapter", "tritonserver", "engine relay")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="one-token requests per path in each pass")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--output-tokens", type=int, default=1, help="tokens per request")
    parser.add_argument("--step-ms", type=float, default=0.0, help="the synthetic engine's step time")
    args = parser.parse_args()
    os.environ["SYNTHETIC_STEP_MS"] = str(args.step_ms)  # the in-process engine's, and the stack's through it

    from bench.synthetic_engine import SyntheticEngine
    from build.default_model import ensure_default_model
    from launcher.stack_process import start_stack, stop_stack

    model_dir = ensure_default_model().resolve()  # only its tokenizer is used
    prompts, n, tokens = Prompts(model_dir, PROMPT_TOKENS), args.requests, args.output_tokens
    stack = start_stack(model_dir, bench_cache("bench-first-token"), ENGINE_KIND="synthetic",
                        ENGINE_MAX_BATCH_SIZE="4", NIM_MAX_MODEL_LEN=str(PROMPT_TOKENS + 64))
    engine = SyntheticEngine(max_batch_size=4, max_seq_len=PROMPT_TOKENS + 64)
    paths = {
        "synthetic engine in-process": lambda: in_process_load(engine, prompts, 1, tokens, n),
        "gRPC to tensorrt_llm": lambda: run_clients(grpc_level(stack.grpc_url, "tensorrt_llm", prompts, 1, tokens,
                                                               n)),
        "HTTP to the adapter": lambda: run_clients(run_level(stack.openai_base_url, stack.model_name, prompts, 1,
                                                             tokens, True, n)),
    }
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    try:
        for run in paths.values():  # warm-up
            run()
        for _ in range(args.passes):
            for name, run in paths.items():
                before = stack_cpu(stack)  # the synthetic engine's own thread is its "compute"
                result = run()
                after = stack_cpu(stack)
                result["cpu_ms_per_request"] = {k: 1000 * (after[k] - before.get(k, 0.0)) / n for k in after}
                runs[name].append(result)
                print(name, round(result["ttft_p50_ms"], 2), flush=True)
    finally:
        stop_stack(stack)
        engine.close()

    def first_token(name: str) -> float:
        return statistics.median(r["ttft_p50_ms"] for r in runs[name])

    def cpu(name: str, part: str) -> float:
        return statistics.median(r["cpu_ms_per_request"].get(part, 0.0) for r in runs[name])

    floor = first_token("synthetic engine in-process")
    shape = "one-token" if tokens == 1 else f"{tokens}-token"
    paced = f", a step every {args.step_ms:g} ms" if args.step_ms else ""
    title = (f"# SYNTHETIC engine{paced}, {platform.machine()}, {os.cpu_count()} cores: {shape} streaming requests "
             f"one at a time, {PROMPT_TOKENS}-token prompts, medians of {args.passes} passes of {n} requests")
    lines = [title, "", "| path | first token p50 ms | more than in-process ms | CPU ms per request: "
             + " / ".join(PARTS) + " |", "|---|---|---|---|"]
    for name in runs:
        # In-process, this process is the engine itself: no stack, no client to count.
        cells = "" if name.endswith("in-process") else " / ".join(f"{cpu(name, part):.2f}" for part in PARTS)
        lines.append(f"| {name} | {first_token(name):.2f} | {first_token(name) - floor:+.2f} | {cells} |")
    write_results("first_token" if tokens == 1 else f"first_token-out{tokens}", lines, runs)


if __name__ == "__main__":
    main()
