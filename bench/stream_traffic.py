"""What streaming each token through the stack costs the engine: the same load on stacks that differ only in
the engine's `stream_interval` (engine steps between streamed responses; 0 is auto, the default), and on the
engine in-process, in turn.

    .venv/bin/python -m bench.stream_traffic [--concurrency 16] [--intervals 1 0 200] [--passes 3]

One stack per interval is started (on free ports), then each pass runs the load (128 in / 128 out tokens,
`ignore_eos`, greedy, streamed) on every stack and on the CPU engine in-process in turn; each is reported by its
median pass. With an interval above the output length a request's tokens cross Triton, postprocessing, the
adapter and the client twice (the first token, then the rest), so that run is the engine's speed inside the
stack with next to no per-token traffic. Not part of `make bench`: it is the measurement behind the README's
"at 16 streams" paragraph and its `ENGINE_STREAM_INTERVAL` advice.
"""

from __future__ import annotations

import argparse

from bench.serve_load import (Prompts, bench_cache, in_process_load, load_context, median_run, run_level,
                              runs_table, start_load_stack, write_results)
from bench.sse import run_clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 0, 200])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    args = parser.parse_args()

    from build.default_model import ensure_default_model
    from engine import Engine
    from launcher.stack_process import stop_stack

    model_dir = ensure_default_model().resolve()
    prompts = Prompts(model_dir, args.input_tokens)
    stacks, runs = {}, {}
    in_process = f"in-process engine c={args.concurrency}"
    engine = Engine(model_dir, max_batch_size=args.concurrency,
                    max_seq_len=load_context(args.input_tokens, args.output_tokens))
    try:
        in_process_load(engine, prompts, 2, 8, 1)  # warm-up, as the stacks have
        for interval in args.intervals:
            stack = start_load_stack(model_dir, bench_cache(f"bench-traffic-{interval}"), args.concurrency,
                                     args.input_tokens, args.output_tokens, ENGINE_STREAM_INTERVAL=str(interval))
            stacks[interval] = stack
            run_clients(run_level(stack.openai_base_url, stack.model_name, prompts, 2, 8, True, 1))  # warm-up
        for _ in range(args.passes):
            for interval, stack in stacks.items():
                run = run_clients(run_level(stack.openai_base_url, stack.model_name, prompts, args.concurrency,
                                            args.output_tokens, True, 1))
                name = f"stream c={args.concurrency}, engine stream_interval {interval or 'auto'}"
                runs.setdefault(name, []).append(run)
                print(f"stream_interval {interval}: {run['output_tok_s']:.1f} tok/s", flush=True)
            run = in_process_load(engine, prompts, args.concurrency, args.output_tokens, 1)
            runs.setdefault(in_process, []).append(run)
            print(f"in-process: {run['output_tok_s']:.1f} tok/s", flush=True)
    finally:
        engine.close()
        for stack in stacks.values():
            stop_stack(stack)

    rows = {f"{name}, median of {args.passes}": median_run(r) for name, r in runs.items()}
    lines = runs_table(model_dir, args.input_tokens, args.output_tokens, rows)
    write_results(f"stream_traffic-c{args.concurrency}", lines, rows)


if __name__ == "__main__":
    main()
