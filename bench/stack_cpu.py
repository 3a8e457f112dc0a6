"""What the serving stack costs in CPU per streamed token at one stream, without the model's noise: the SYNTHETIC
engine (bench/synthetic_engine.py) paced at the model's step time, so every process of the stack wakes once per
token as it does with the model, while the engine itself uses no CPU.

    .venv/bin/python -m bench.stack_cpu [--step-ms 19] [--passes 6] [--baseline PATH] [--baseline-env K=V,...]

At one stream on two cores the engine keeps both cores busy, so each millisecond of CPU the stack spends per token
lengthens the engine's ~19 ms step by about half a millisecond (`bench.stack_layers` measures that end to end, with
15% of noise run to run). CPU per token is the steadier figure: each pass streams --rounds requests of
--output-tokens tokens through the adapter's OpenAI API and reads each process's CPU from /proc.

With `--baseline PATH` (another checkout of this repository, e.g. `git worktree add /tmp/base <commit>`; its
`.cache` linked to this one's) a second stack runs that code, the two alternate pass by pass, and each pass is
paired with the baseline's pass next to it: a change's effect as a ratio within one run. The baseline needs
SYNTHETIC_STEP_MS (this commit or later). `--baseline-env` runs the baseline with extra environment, from this
checkout when no PATH is given (`--baseline-env GRPC_EXPERIMENTS=`: the adapter on gRPC's EventEngine client).
Writes bench/results/stack_cpu.md and .json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

from bench.serve_load import Prompts, bench_cache, run_level, write_results
from bench.stack_layers import paired_summary, stack_cpu
from bench.sse import run_clients

PROMPT_TOKENS = 128
PARTS = ("client", "adapter", "tritonserver", "engine model")


def start_paced_stack(model_dir: Path, repo: Path, name: str, step_ms: float, env: dict[str, str]):
    from launcher.stack_process import start_stack

    return start_stack(model_dir, bench_cache(name), repo_root=repo.resolve(), ENGINE_KIND="synthetic",
                       ENGINE_MAX_BATCH_SIZE="4", NIM_MAX_MODEL_LEN="512", SYNTHETIC_STEP_MS=str(step_ms), **env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=float, default=19.0, help="the synthetic engine's step time")
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4, help="requests in each pass")
    parser.add_argument("--output-tokens", type=int, default=200)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with, pass by pass")
    parser.add_argument("--baseline-env", default="", help="K=V,... for the baseline's stack")
    args = parser.parse_args()
    baseline_env = dict(kv.split("=", 1) for kv in args.baseline_env.split(",") if kv)

    from build.default_model import ensure_default_model
    from launcher.stack_process import REPO_ROOT, stop_stack

    model_dir = ensure_default_model().resolve()  # only its tokenizer is used
    prompts, tokens = Prompts(model_dir, PROMPT_TOKENS), args.rounds * args.output_tokens
    sides = {"this checkout": (REPO_ROOT, {})}
    if args.baseline or baseline_env:
        sides["baseline"] = (args.baseline or REPO_ROOT, baseline_env)
    stacks = {}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    try:
        for side, (repo, env) in sides.items():
            stacks[side] = start_paced_stack(model_dir, repo, f"bench-stack-cpu-{len(stacks)}", args.step_ms, env)
        for stack in stacks.values():  # warm-up
            run_clients(run_level(stack.openai_base_url, stack.model_name, prompts, 1, args.output_tokens, True, 1))
        for p in range(args.passes):
            for side in (list(stacks) if p % 2 == 0 else list(reversed(stacks))):
                stack = stacks[side]
                before = stack_cpu(stack, whole_engine_model=True)
                result = run_clients(run_level(stack.openai_base_url, stack.model_name, prompts, 1,
                                               args.output_tokens, True, args.rounds))
                after = stack_cpu(stack, whole_engine_model=True)
                result["cpu_ms_per_token"] = {k: 1000 * (after[k] - before.get(k, 0.0)) / tokens for k in after}
                runs[side].append(result)
                print(side, {k: round(v, 3) for k, v in result["cpu_ms_per_token"].items()}, flush=True)
    finally:
        for stack in stacks.values():
            stop_stack(stack)

    def cpu(side: str, part: str) -> float:
        return statistics.median(r["cpu_ms_per_token"].get(part, 0.0) for r in runs[side])

    def served(run: dict) -> float:  # everything but the client
        return sum(v for k, v in run["cpu_ms_per_token"].items() if k != "client")

    title = (f"# SYNTHETIC engine paced at {args.step_ms:g} ms a step, {platform.machine()}, {os.cpu_count()} "
             f"cores: one stream through the adapter, {PROMPT_TOKENS}-token prompts, {args.output_tokens} tokens, "
             f"medians of {args.passes} passes of {args.rounds} requests")
    lines = [title, "", "| stack | ITL p50 ms | CPU ms per token: " + " / ".join(PARTS)
             + " | the stack without the client | paired against the baseline |", "|---|---|---|---|---|"]
    for side in runs:
        paired = ""
        if side != "baseline" and "baseline" in runs:
            paired = paired_summary([served(a) / served(b) - 1 for a, b in zip(runs[side], runs["baseline"])])
        itl = statistics.median(r["itl_p50_ms"] for r in runs[side])
        cells = " / ".join(f"{cpu(side, part):.2f}" for part in PARTS)
        total = statistics.median(served(r) for r in runs[side])
        repo, env = sides[side]
        where = f"{repo}" + "".join(f", {k}={v!r}" for k, v in env.items())
        lines.append(f"| {side} ({where}) | {itl:.2f} | {cells} | {total:.2f} | {paired} |")
    write_results("stack_cpu", lines, runs)


if __name__ == "__main__":
    main()
