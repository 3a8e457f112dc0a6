"""Where the serving stack's time goes at one stream: the same load through each layer in turn, with the
in-process engine in the same run, and each process's CPU per delivered token.

    .venv/bin/python -m bench.stack_layers [--passes 6] [--rounds 2] [--concurrency 1] [--layers http,...] [--slots N]

Layers: the CPU engine driven in-process (the floor); a gRPC client streaming from Triton's `tensorrt_llm` model
directly (Triton and the engine's Python-backend host); the same client streaming from the `ensemble` (adds
preprocessing and the per-response postprocessing hop); an OpenAI client streaming /v1/completions from the
adapter set to go through the ensemble (NIM_PIPELINE_IN_ADAPTER=0: adds the adapter, HTTP and SSE); and from the
adapter as it runs by default, preprocessing and postprocessing in it and streaming from `tensorrt_llm`. Every
layer runs --passes times, interleaved with the others (this machine's noise is about 15% run to run), the layers
in reverse order every other pass so that a drift within a pass favours none; each is reported as its median pass,
and as the median (and quartiles) of its passes' ratios to the in-process pass of the same round: the machine's
drift cancels out of a pair. `--layers` picks some of grpc-engine, grpc-ensemble,
http-ensemble and http (default: all). Prompts are distinct (`serve_load.Prompts`), 128 tokens in and out with
ignore_eos, as in bench.serve_load. With `--output-tokens 1` (results in stack_layers-c1-out1.md) a pass is only
first tokens: `--output-tokens 1 --rounds 1 --passes 30 --layers grpc-engine,http` pairs 30 of them. `--slots`
gives the served and the in-process engine that many cache slots (default: the concurrency, at least 2), as
bench.serve_load serves 32 for its c=32 level (results in stack_layers-c<N>-slots<S>.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
import uuid
from pathlib import Path

import numpy as np

from bench.serve_load import (
    Prompts,
    RequestTiming,
    bench_cache,
    in_process_load,
    load_context,
    run_level,
    start_load_stack,
    summarize,
    write_results,
)
from launcher.cpu_cores import split_cores
from launcher.serve import descendants
from launcher.stack_process import Stack
from bench.sse import run_clients

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LAYERS = {  # --layers id -> the layer's name in the results
    "grpc-engine": "gRPC to tensorrt_llm",
    "grpc-ensemble": "gRPC to ensemble",
    "http-ensemble": "HTTP to the adapter, through the ensemble",
    "http": "HTTP to the adapter (pre- and postprocessing in it)",
}
IN_PROCESS = "in-process engine"
DEFAULT_OUTPUT_TOKENS = 128


def engine_model_inputs(prompt: list[int], output_tokens: int) -> dict[str, np.ndarray]:
    """A streamed `tensorrt_llm` request in TensorRT-LLM's tensors, without an end id (ignore_eos)."""
    return {
        "input_ids": np.array([prompt], dtype=np.int32),
        "input_lengths": np.array([[len(prompt)]], dtype=np.int32),
        "request_output_len": np.array([[output_tokens]], dtype=np.int32),
        "end_id": np.array([[-1]], dtype=np.int32),
        "streaming": np.array([[True]], dtype=np.bool_),
        "exclude_input_in_output": np.array([[True]], dtype=np.bool_),
    }


async def grpc_level(grpc_url: str, model: str, prompts: Prompts, concurrency: int, output_tokens: int,
                     rounds: int) -> dict:
    """Streaming requests straight to a Triton model over gRPC, as a gRPC client of Triton sends them."""
    from tritonclient.grpc import InferResult
    from tritonclient.grpc.aio import InferenceServerClient

    from adapter.engine import GenerationParams
    from adapter.triton_engine import ensemble_inputs, ensemble_outputs, infer_request, is_final

    params = GenerationParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    token_ids_output = "output_token_ids" if model == "ensemble" else "output_ids"
    client = InferenceServerClient(grpc_url)

    async def one(prompt: list[int]) -> RequestTiming:
        request_id = f"layers-{uuid.uuid4().hex}"  # the engine tells requests apart by id
        if model == "ensemble":
            request = infer_request(model, request_id, ensemble_inputs(prompt, params), ensemble_outputs(params))
        else:
            request = infer_request(model, request_id, engine_model_inputs(prompt, output_tokens))
        done = asyncio.Event()

        async def requests():
            yield request
            await done.wait()

        start, first, tokens = time.perf_counter(), None, 0
        async for response in client._client_stub.ModelStreamInfer(requests()):  # noqa: SLF001 - as the adapter
            if response.error_message:
                raise RuntimeError(response.error_message)
            if response.infer_response.outputs:
                tokens += InferResult(response.infer_response).as_numpy(token_ids_output).size
                first = first or time.perf_counter()
            if is_final(response.infer_response):
                break
        done.set()
        end = time.perf_counter()
        return RequestTiming((first or end) - start, end - start, tokens)

    async def worker():
        return [await one(prompts.take()) for _ in range(rounds)]

    try:
        await client.is_server_live()  # the channel connects before the clock starts, as run_level's connections
        start = time.perf_counter()
        results = await asyncio.gather(*(worker() for _ in range(concurrency)))
        return summarize([t for per_worker in results for t in per_worker], time.perf_counter() - start)
    finally:
        await client.close()


def cpu_seconds(path: str) -> float:
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


ENGINE_HELPERS = ("chunk-pool", "engine-omp")  # the engine thread's compute helpers (engine/engine.py)


def stack_cpu(stack: Stack, whole_engine_model: bool = False) -> dict[str, float]:
    """CPU seconds so far of each part of the stack, and of this process (the benchmark's client). The engine
    model's process counts without its busiest thread (the engine's) and that thread's helpers: what is left is
    its relay to Triton. With `whole_engine_model` (a SYNTHETIC engine, whose thread computes nothing) it counts
    whole, as "engine model"."""
    parts: dict[str, float] = {}
    for pid in descendants(stack.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_text()
            for name in ("adapter", "tritonserver", "preprocessing", "postprocessing"):
                if name in command and "tensorrt_llm" not in command:
                    parts[name] = parts.get(name, 0.0) + cpu_seconds(f"/proc/{pid}/stat")
                    break
            else:
                if "tensorrt_llm" not in command:
                    continue
                if whole_engine_model:
                    parts["engine model"] = cpu_seconds(f"/proc/{pid}/stat")
                else:
                    tasks = [f"/proc/{pid}/task/{t}" for t in os.listdir(f"/proc/{pid}/task")]
                    threads = sorted(cpu_seconds(f"{t}/stat") for t in tasks
                                     if Path(f"{t}/comm").read_text().strip() not in ENGINE_HELPERS)
                    parts["engine relay"] = sum(threads[:-1])
        except OSError:
            continue  # a process that just ended
    times = os.times()
    parts["client"] = times.user + times.system
    return parts


def paired_summary(behind: list[float]) -> str:
    """Paired differences as fractions (0.03: 3% more) by their median and quartiles: "+3% (+1% to +6%)"."""
    low, mid, high = statistics.quantiles(behind, n=4) if len(behind) > 1 else behind * 3
    return f"{mid:+.0%} ({low:+.0%} to {high:+.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client in each pass")
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS)
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated, of: " + ", ".join(LAYERS))
    parser.add_argument("--slots", type=int, help="cache slots of both engines (default: the concurrency, at least 2)")
    parser.add_argument("--engine-cores", default="", help="ENGINE_CPU_CORES for the stack and the in-process "
                        "engine (e.g. 0); this benchmark's client then runs on the other cores")
    args = parser.parse_args()
    chosen = args.layers.split(",")
    if unknown := set(chosen) - set(LAYERS):
        parser.error(f"unknown layers {sorted(unknown)}: use {', '.join(LAYERS)}")

    from build.default_model import ensure_default_model
    from engine import Engine
    from launcher.stack_process import stop_stack

    model_dir = (args.model_dir or ensure_default_model()).resolve()
    prompts = Prompts(model_dir, args.input_tokens)
    n, out, rounds = args.concurrency, args.output_tokens, args.rounds
    slots = args.slots or max(n, 2)
    engine_cores, other_cores = split_cores(args.engine_cores) if args.engine_cores else (None, None)
    cores_env = {"ENGINE_CPU_CORES": args.engine_cores} if args.engine_cores else {}
    stack = start_load_stack(model_dir, bench_cache("bench"), slots, args.input_tokens, out, **cores_env)
    # The same service with every request through Triton's ensemble, the adapter's default before.
    via_ensemble = (start_load_stack(model_dir, bench_cache("bench-ensemble"), slots, args.input_tokens, out,
                                     NIM_PIPELINE_IN_ADAPTER="0", **cores_env) if "http-ensemble" in chosen else None)
    if engine_cores:  # now that the stacks started with every core (launcher/cpu_cores.py)
        os.sched_setaffinity(0, other_cores)  # the client, as the launcher confines the service's other threads
    model = stack.model_name
    passes = {  # layer id -> (one pass, the stack whose CPU it counts)
        "grpc-engine": (lambda: run_clients(grpc_level(stack.grpc_url, "tensorrt_llm", prompts, n, out, rounds)),
                        stack),
        "grpc-ensemble": (lambda: run_clients(grpc_level(stack.grpc_url, "ensemble", prompts, n, out, rounds)),
                          stack),
        "http-ensemble": (lambda: run_clients(run_level(via_ensemble.openai_base_url, model, prompts, n, out, True,
                                                        rounds)), via_ensemble),
        "http": (lambda: run_clients(run_level(stack.openai_base_url, model, prompts, n, out, True, rounds)), stack),
    }
    layers = {LAYERS[key]: passes[key] for key in LAYERS if key in chosen}
    runs: dict[str, list[dict]] = {}
    try:
        with Engine(model_dir, max_batch_size=slots, max_seq_len=load_context(prompts.length, out),
                    cpu_cores=engine_cores) as engine:
            layers = {IN_PROCESS: (lambda: in_process_load(engine, prompts, n, out, rounds), stack), **layers}
            for run, _ in layers.values():  # warm-up
                run()
            for p in range(args.passes):
                for name, (run, measured) in (list(layers.items()) if p % 2 == 0 else reversed(layers.items())):
                    before = stack_cpu(measured)
                    result = run()
                    after = stack_cpu(measured)
                    tokens = result["output_tok_s"] * result["requests"] / result["requests_s"]
                    result["cpu_ms_per_token"] = {k: 1000 * (after[k] - before.get(k, 0.0)) / tokens for k in after}
                    runs.setdefault(name, []).append(result)
                    print(name, {k: round(v, 2) for k, v in result.items() if k != "cpu_ms_per_token"}, flush=True)
    finally:
        stop_stack(stack)
        if via_ensemble is not None:
            stop_stack(via_ensemble)
    # Named apart from the default load's table: a run of one output token measures first tokens alone.
    suffix = f"-out{out}" if out != DEFAULT_OUTPUT_TOKENS else ""
    suffix += f"-engine-cores-{args.engine_cores}" if args.engine_cores else ""
    suffix += f"-slots{slots}" if args.slots else ""
    write_results(f"stack_layers-c{n}{suffix}", layers_table(model_dir, args, runs), runs)


def layers_table(model_dir: Path, args, runs: dict[str, list[dict]]) -> list[str]:
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    def cpu(name: str, part: str) -> float:
        # The mean, not the median: /proc counts CPU in 10 ms ticks, coarser than a short pass's share.
        return statistics.mean(r["cpu_ms_per_token"].get(part, 0.0) for r in runs[name])

    def paired(name: str) -> str:
        """Against the in-process pass of each of the layer's rounds: the median and quartiles of its e2e, % behind,
        and the median of its first token's difference."""
        if name == IN_PROCESS:
            return " | "
        behind = [r["e2e_p50_s"] / f["e2e_p50_s"] - 1 for r, f in zip(runs[name], runs[IN_PROCESS])]
        ttft = statistics.median(r["ttft_p50_ms"] - f["ttft_p50_ms"] for r, f in zip(runs[name], runs[IN_PROCESS]))
        return f"{paired_summary(behind)} | {ttft:+.1f}"

    floor = median(IN_PROCESS, "e2e_p50_s")
    parts = ["client", "adapter", "tritonserver", "postprocessing", "engine relay"]
    setup = f", the engine on cores {args.engine_cores} (ENGINE_CPU_CORES)" if args.engine_cores else ""
    setup += f", {args.slots} cache slots in each engine" if args.slots else ""
    lines = [f"# {platform.machine()}, {os.cpu_count()} cores{setup}, model {model_dir.name}, {args.input_tokens} in "
             f"/ {args.output_tokens} out tokens, ignore_eos, concurrency {args.concurrency}, medians of "
             f"{args.passes} interleaved passes of {args.rounds} request(s) per client", "",
             "| layer | TTFT p50 ms | ITL p50 ms | e2e p50 s | behind in-process | paired: e2e behind, median "
             "(quartiles) | paired: TTFT ms more | CPU ms per token: " + " / ".join(parts) + " |",
             "|---|---|---|---|---|---|---|---|"]
    for name in runs:
        e2e = median(name, "e2e_p50_s")
        # In-process, this process is the engine itself: no stack, no client to count. A one-token request's
        # CPU is mostly its prefill's and the client process's idle OpenMP team's: bench.first_token measures it.
        counted = name != IN_PROCESS and args.output_tokens > 1
        cells = " / ".join(f"{cpu(name, p):.2f}" for p in parts) if counted else ""
        lines.append(f"| {name} | {median(name, 'ttft_p50_ms'):.0f} | {median(name, 'itl_p50_ms'):.2f} | {e2e:.3f} | "
                     f"{100 * (e2e / floor - 1):+.0f}% | {paired(name)} | {cells} |")
    return lines


if __name__ == "__main__":
    main()
