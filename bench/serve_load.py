"""Serving load through the whole stack (OpenAI API -> adapter -> Triton -> CPU engine), the way users
measure it, with its baselines in the same run.

    .venv/bin/python -m bench.serve_load [--url http://host:8000/v1] [--concurrency 1 4 16 32]

Without --url it starts the service on the default model (`python -m launcher` on free ports). Each request
sends a prompt of its own (`Prompts`: nothing for KV cache reuse to find) of exactly --input-tokens token ids
to /v1/completions with `ignore_eos`, asks for --output-tokens tokens, and streams. Reported per concurrency:
time to first token p50/p99, inter-token latency p50, output tokens/s and requests/s. Baselines in the same
run: the CPU engine driven in-process on the same load (what the adapter and Triton add, at concurrency 1 and 16)
and non-streamed requests at concurrency 16 (what streaming costs), each run in turn with the stack's streamed
run --baseline-passes times and reported as each side's median run and as paired ratios (each pass's streamed
run against the baselines of the same pass, so the machine's drift cancels out); and transformers' continuous
batching (`generate_batch`) on the same checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

from bench.sse import client_session, run_clients, sse_chunks

RESULTS = Path(__file__).resolve().parent / "results"
NON_STREAM_CONCURRENCY = 16
BASELINE_LEVELS = [1, NON_STREAM_CONCURRENCY]
PAIRED = "paired ratios"  # the results' entry of PAIRED_RATIOS, by what each measures
# (what the ratio measures, the streamed run, the baseline it is divided by): one paired ratio per pass.
PAIRED_RATIOS = (
    (f"streaming against non-streaming, c={NON_STREAM_CONCURRENCY}", f"stream c={NON_STREAM_CONCURRENCY}",
     f"non-stream c={NON_STREAM_CONCURRENCY}"),
    *((f"the stack against the in-process engine, c={n}", f"stream c={n}", f"in-process engine c={n}")
      for n in BASELINE_LEVELS),
)


@dataclass
class RequestTiming:
    ttft: float
    e2e: float
    tokens: int

    @property
    def itl(self) -> float:
        return (self.e2e - self.ttft) / max(self.tokens - 1, 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(timings: list[RequestTiming], wall: float) -> dict:
    return {
        "requests": len(timings),
        "ttft_p50_ms": 1000 * percentile([t.ttft for t in timings], 0.5),
        "ttft_p99_ms": 1000 * percentile([t.ttft for t in timings], 0.99),
        "itl_p50_ms": 1000 * statistics.median(t.itl for t in timings),
        "output_tok_s": sum(t.tokens for t in timings) / wall,
        "requests_s": len(timings) / wall,
        "e2e_p50_s": statistics.median(t.e2e for t in timings),
    }


class Prompts:
    """Prompts of exactly `length` token ids, each request's different from its first word on: the engine's
    KV cache reuse then finds nothing to reuse, and every request is prefilled whole, as when users' prompts
    differ. (A repeated prompt would be prefilled once and copied from the cache after that.)"""

    def __init__(self, model_dir: Path, length: int):
        from tokenization.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(model_dir)
        text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * (length // 4 + 4))
        self._ids = tokenizer.encode(text)[:length]
        self.length = len(self._ids)
        self._head = 1 if self._ids[0] == tokenizer.bos_token_id else 0  # where the first word is
        # Single-token words: the first word of the prompt, a different one per request.
        self._words = [t for t in range(1000, min(tokenizer.vocab_size, 11000))
                       if tokenizer.id_to_token_text(t).strip().isalpha()]
        self._taken = 0

    def take(self) -> list[int]:
        if self._taken == len(self._words):
            raise RuntimeError(f"only {len(self._words)} distinct prompts: the benchmark sent them all")
        ids = list(self._ids)
        ids[self._head] = self._words[self._taken]
        self._taken += 1
        return ids


async def one_request(client: aiohttp.ClientSession, url: str, model: str, prompt: list[int], output_tokens: int,
                      stream: bool) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "ignore_eos": True,
            "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    first, tokens = None, 0
    if not stream:
        async with client.post(f"{url}/completions", json=body) as reply:
            reply.raise_for_status()
            answer = await reply.json()
        end = time.perf_counter()
        return RequestTiming(end - start, end - start, answer["usage"]["completion_tokens"])
    async with client.post(f"{url}/completions", json=body) as reply:
        async for chunk in sse_chunks(reply):
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return RequestTiming((first or end) - start, end - start, tokens)


async def run_level(url: str, model: str, prompts: Prompts, concurrency: int, output_tokens: int,
                    stream: bool, rounds: int) -> dict:
    async with client_session(concurrency + 4) as client:
        async def worker():
            return [await one_request(client, url, model, prompts.take(), output_tokens, stream)
                    for _ in range(rounds)]

        # Connections open before the clock starts, as a benchmark tool's are kept alive from one request to the
        # next: a first request's time is then the service's, not the client's connection setup.
        async def connect() -> None:
            async with client.get(f"{url}/models") as reply:
                await reply.read()

        await asyncio.gather(*(connect() for _ in range(concurrency)))
        start = time.perf_counter()
        results = await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    summary = summarize([t for per_worker in results for t in per_worker], wall)
    if not stream:
        del summary["itl_p50_ms"]  # one response: no tokens in between
    return summary


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["output_tok_s"])[len(runs) // 2]


def alternating_baselines(url: str, model: str, model_dir: Path, prompts: Prompts, levels: list[int],
                          output_tokens: int, rounds: int, passes: int, slots: int) -> dict[str, list[dict]]:
    """At each level, the stack streaming, the stack not streaming (at NON_STREAM_CONCURRENCY) and the engine
    in-process, one after another, `passes` times, every other pass in reverse order so that a drift within a
    pass favours no side; every run by name, in pass order. On this shared 2-core machine one run can be 15% off
    either way from noise alone, so single runs in sequence compare noise."""
    from engine import Engine

    def through_stack(concurrency: int, stream: bool) -> dict:
        return run_clients(run_level(url, model, prompts, concurrency, output_tokens, stream, rounds))

    context = load_context(prompts.length, output_tokens)
    # As many cache slots as the served engine (start_load_stack), so that the pairs differ in the stack alone.
    with Engine(model_dir, max_batch_size=slots, max_seq_len=context) as engine:
        in_process_load(engine, prompts, 2, 8, 1)  # warm-up, as the stack had
        one_pass = []  # (name, run)
        for n in levels:
            for stream in (True, False) if n == NON_STREAM_CONCURRENCY else (True,):
                one_pass.append((f"{'stream' if stream else 'non-stream'} c={n}",
                                 functools.partial(through_stack, n, stream)))
            one_pass.append((f"in-process engine c={n}",
                             functools.partial(in_process_load, engine, prompts, n, output_tokens, rounds)))
        runs: dict[str, list[dict]] = {name: [] for name, _ in one_pass}
        for p in range(passes):
            for name, run in one_pass if p % 2 == 0 else reversed(one_pass):
                runs[name].append(run())
    return runs


def paired_ratios(runs: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Each PAIRED_RATIOS entry's output tok/s ratios, one per pass: 0.97 is 3% behind its baseline."""
    return {what: [a["output_tok_s"] / b["output_tok_s"] for a, b in zip(runs[streamed], runs[baseline])]
            for what, streamed, baseline in PAIRED_RATIOS if streamed in runs and baseline in runs}


def paired_table(ratios: dict[str, list[float]]) -> list[str]:
    """Markdown lines: each paired ratio's median over the passes, and its lowest and highest pass."""
    lines = ["| paired by pass (output tok/s) | median | lowest pass | highest pass |", "|---|---|---|---|"]
    for what, values in ratios.items():
        lines.append(f"| {what} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    return lines


def in_process_load(engine, prompts: Prompts, concurrency: int, output_tokens: int, rounds: int) -> dict:
    """The same load on the CPU engine with no Triton and no HTTP: the floor the stack is compared with."""
    from engine import SamplingParams

    timings: list[RequestTiming] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        for r in range(rounds):
            done, state = threading.Event(), {}
            start = time.perf_counter()

            def on_output(output):
                now = time.perf_counter()
                if output.token_ids:
                    state.setdefault("first", now)
                if output.finished:
                    state["end"], state["tokens"] = now, output.num_output_tokens
                    done.set()

            params = SamplingParams(max_new_tokens=output_tokens, temperature=0.0, streaming=True)
            with lock:
                prompt = prompts.take()
            engine.submit(f"bench-{index}-{r}-{uuid.uuid4().hex}", prompt, params, on_output)
            done.wait()
            with lock:
                timings.append(RequestTiming(state["first"] - start, state["end"] - start, state["tokens"]))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(timings, time.perf_counter() - start)


def transformers_continuous_batching(model_dir: Path, prompts: Prompts, concurrency: int, output_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False,
                              eos_token_id=None)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=[prompts.take() for _ in range(concurrency)], generation_config=config,
                                   progress_bar=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return {"requests": concurrency, "output_tok_s": tokens / wall, "requests_s": concurrency / wall}


def bench_cache(name: str) -> Path:
    """A benchmark's work folder: $NIM_CACHE_PATH/<name>, by default .cache/<name>."""
    return Path(os.environ.get("NIM_CACHE_PATH", Path(__file__).resolve().parent.parent / ".cache")) / name


def start_load_stack(model_dir: Path, work: Path, concurrency: int, input_tokens: int, output_tokens: int,
                     **extra_env: str):
    """The service on free ports, sized for `concurrency` sequences of input + output tokens."""
    from launcher.stack_process import start_stack

    return start_stack(model_dir, work, ENGINE_MAX_BATCH_SIZE=str(concurrency),
                       ENGINE_MAX_QUEUE_SIZE=str(4 * concurrency),
                       NIM_MAX_MODEL_LEN=str(load_context(input_tokens, output_tokens)), **extra_env)


def load_context(input_tokens: int, output_tokens: int) -> int:
    """Context length (the engine's max_seq_len) for this load: prompt and completion, plus a little room."""
    return input_tokens + output_tokens + 16


def metric_cells(r: dict) -> str:
    """A results row's TTFT p50 / p99, ITL p50, output tok/s and req/s table cells; blank where a run has none."""
    def cell(key: str, digits: int) -> str:
        return f"{r[key]:.{digits}f}" if key in r else ""

    return (f"{cell('ttft_p50_ms', 0)} | {cell('ttft_p99_ms', 0)} | {cell('itl_p50_ms', 1)} | "
            f"{r['output_tok_s']:.1f} | {r['requests_s']:.2f}")


def runs_table(model_dir: Path, input_tokens: int, output_tokens: int, rows: dict) -> list[str]:
    """Markdown lines: the machine and load, then one row per named run."""
    return [f"# {platform.machine()}, {os.cpu_count()} cores, model {model_dir.name}, "
            f"{input_tokens} in / {output_tokens} out tokens, ignore_eos", "",
            "| run | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | output tok/s | req/s |", "|---|---|---|---|---|---|",
            *(f"| {name} | {metric_cells(r)} |" for name, r in rows.items())]


def write_results(name: str, lines: list[str], rows: dict) -> None:
    """Prints the markdown table and writes it to bench/results/<name>.md, the rows to <name>.json."""
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service's /v1 URL; default: start one")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="requests per client at each concurrency")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--baseline-passes", type=int, default=6,
                        help="how many times the baselines alternate with the stack's streamed runs")
    args = parser.parse_args()

    from build.default_model import ensure_default_model
    from launcher.stack_process import stop_stack

    model_dir = (args.model_dir or ensure_default_model()).resolve()
    prompts = Prompts(model_dir, args.input_tokens)
    top = max(args.concurrency + [NON_STREAM_CONCURRENCY])
    stack = None
    if args.url:
        url = args.url
    else:
        stack = start_load_stack(model_dir, bench_cache("bench"), top, args.input_tokens, args.output_tokens)
        url = stack.openai_base_url
    model = httpx.get(f"{url}/models").json()["data"][0]["id"]
    rows, baselines = {}, {}
    try:
        run_clients(run_level(url, model, prompts, 2, 8, True, 1))  # warm-up
        for n in args.concurrency:
            rows[f"stream c={n}"] = run_clients(run_level(url, model, prompts, n, args.output_tokens, True,
                                                          args.rounds))
            print(n, rows[f"stream c={n}"], flush=True)
        if not args.skip_baselines:
            baselines = alternating_baselines(url, model, model_dir, prompts, BASELINE_LEVELS, args.output_tokens,
                                              args.rounds, args.baseline_passes, slots=top)
            rows.update({f"{name}, median of {args.baseline_passes}": median_run(runs)
                         for name, runs in baselines.items()})
    finally:
        if stack:
            stop_stack(stack)
    if not args.skip_baselines:
        rows["transformers generate_batch c=16"] = transformers_continuous_batching(
            model_dir, prompts, 16, args.output_tokens)
        rows[PAIRED] = paired_ratios(baselines)
    lines = runs_table(model_dir, args.input_tokens, args.output_tokens, {k: v for k, v in rows.items() if k != PAIRED})
    if PAIRED in rows:
        lines += ["", *paired_table(rows[PAIRED])]
    # Without its baselines a run is not the README's table: it must not overwrite it.
    write_results("serve_load-partial" if args.skip_baselines else "serve_load", lines, rows)


if __name__ == "__main__":
    main()
