"""What a long prompt does to the streams already running: the CPU engine in-process, four streams decoding
when a prompt of --long-tokens arrives, with chunked prefill (the engine's budget, 512 tokens a pass) and with
the whole prompt in one pass, alternating in one run.

    .venv/bin/python -m bench.long_prompt [--long-tokens 3000] [--passes 2]

Reported per setting: the running streams' longest gap between two tokens and their median gap while the
prompt is prefilled, and the long prompt's time to first token. Writes bench/results/long_prompt.md and
.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

from bench.serve_load import Prompts, write_results

STREAMS = 4
STREAM_TOKENS = 300
SETTINGS = {"chunks of 512 tokens": 512, "one pass": 1 << 20}


def one_run(engine, prompts: Prompts, long_prompt: list[int]) -> dict:
    from engine import SamplingParams

    stamps: dict[str, list[float]] = {f"s{i}": [] for i in range(STREAMS)}
    long_submitted, long_first, lock = [0.0], [0.0], threading.Lock()
    done = threading.Semaphore(0)

    def on_stream(output):
        now = time.perf_counter()
        with lock:
            stamps[output.request_id].extend([now] * len(output.token_ids))
            if output.request_id == "s0" and output.num_output_tokens >= 20 and not long_submitted[0]:
                long_submitted[0] = now
                engine.submit("long", long_prompt, SamplingParams(max_new_tokens=4, temperature=0.0), on_long)
        if output.finished:
            done.release()

    def on_long(output):
        if output.token_ids and not long_first[0]:
            long_first[0] = time.perf_counter()
        if output.finished:
            done.release()

    for i in range(STREAMS):
        params = SamplingParams(max_new_tokens=STREAM_TOKENS, temperature=0.0, streaming=True)
        engine.submit(f"s{i}", prompts.take(), params, on_stream)
    for _ in range(STREAMS + 1):
        done.acquire()
    start, end = long_submitted[0], long_first[0]
    # every gap that overlaps the prefill, the one across a single pass included
    gaps = [b - a for times in stamps.values() for a, b in zip(times, times[1:]) if b >= start and a <= end]
    return {"max_gap_ms": 1000 * max(gaps), "median_gap_ms": 1000 * statistics.median(gaps),
            "long_ttft_ms": 1000 * (end - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-tokens", type=int, default=3000)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()

    import engine.engine as engine_module
    from build.default_model import ensure_default_model
    from engine import Engine

    model_dir = ensure_default_model().resolve()
    prompts, long_prompts = Prompts(model_dir, 128), Prompts(model_dir, args.long_tokens)
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    budget = engine_module.PREFILL_TOKENS
    try:
        with Engine(model_dir, max_batch_size=STREAMS + 1, max_seq_len=args.long_tokens + 64) as engine:
            for _ in range(args.passes):
                for name, tokens in SETTINGS.items():
                    engine_module.PREFILL_TOKENS = tokens  # read by the engine thread at each round
                    runs[name].append(one_run(engine, prompts, long_prompts.take()))
                    print(name, runs[name][-1], flush=True)
    finally:
        engine_module.PREFILL_TOKENS = budget

    lines = [f"# {platform.machine()}, {os.cpu_count()} cores, model {model_dir.name}: {STREAMS} streams decoding, "
             f"then a {args.long_tokens}-token prompt; engine in-process, {args.passes} passes each, alternating", "",
             "| prefill | running streams' longest gap ms | their median gap ms | long prompt's TTFT ms |",
             "|---|---|---|---|"]
    for name, results in runs.items():
        cells = " | ".join(" / ".join(f"{r[key]:.0f}" for r in results)
                           for key in ("max_gap_ms", "median_gap_ms", "long_ttft_ms"))
        lines.append(f"| {name} | {cells} |")
    write_results("long_prompt", lines, runs)


if __name__ == "__main__":
    main()
