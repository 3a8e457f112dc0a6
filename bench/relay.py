"""How many tokens/s the serving stack itself delivers: the SYNTHETIC engine (bench/synthetic_engine.py,
tokens instantly, no model) behind Triton, postprocessing and the adapter, with streaming OpenAI clients.

    .venv/bin/python -m bench.relay [--clients 32] [--tokens 512] [--stream-interval 1 0 16]

For each engine stream interval (engine steps between streamed responses; 0 is auto, the default) it starts
the service, checks that the streamed text equals the non-streamed text, then runs --clients concurrent
streaming completions and reports delivered tokens/s and SSE events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time

import aiohttp

from bench.serve_load import bench_cache, write_results
from bench.sse import client_session, run_clients, sse_chunks

PROMPT = "The quick brown fox jumps over the lazy dog. Ünïcödé 日本語 👋"


async def stream_completion(client: aiohttp.ClientSession, url: str, model: str, tokens: int) -> tuple[str, int, int]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text, events, used = [], 0, 0
    async with client.post(f"{url}/completions", json=body) as reply:
        async for chunk in sse_chunks(reply):
            events += 1
            if chunk["choices"]:
                text.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    return "".join(text), events, used


async def measure(url: str, clients: int, tokens: int) -> dict:
    async with client_session(clients + 4) as client:
        async with client.get(f"{url}/models") as reply:
            model = (await reply.json())["data"][0]["id"]
        async with client.post(f"{url}/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 64,
                                                           "ignore_eos": True}) as reply:
            whole = (await reply.json())["choices"][0]["text"]
        streamed, _, _ = await stream_completion(client, url, model, 64)
        if streamed != whole:
            raise AssertionError("streamed text differs from non-streamed text")
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(client, url, model, tokens) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {
        "tokens_s": sum(r[2] for r in results) / wall,
        "sse_events_s": sum(r[1] for r in results) / wall,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--stream-interval", type=int, nargs="+", default=[1, 0, 16])
    args = parser.parse_args()

    from build.default_model import ensure_default_model
    from launcher.stack_process import start_stack, stop_stack

    model_dir = ensure_default_model()  # only its tokenizer is used
    work = bench_cache("bench-relay")
    rows = {}
    for interval in args.stream_interval:
        stack = start_stack(model_dir, work, ENGINE_KIND="synthetic", ENGINE_STREAM_INTERVAL=str(interval),
                            ENGINE_MAX_BATCH_SIZE=str(args.clients), NIM_MAX_MODEL_LEN=str(args.tokens + 64))
        try:
            rows[interval] = run_clients(measure(stack.openai_base_url, args.clients, args.tokens))
        finally:
            stop_stack(stack)
        print(interval, rows[interval], flush=True)
    lines = [f"# SYNTHETIC engine, {platform.machine()}, {os.cpu_count()} cores, {args.clients} streaming clients x "
             f"{args.tokens} tokens", "",
             "| engine stream_interval | delivered tokens/s | SSE events/s |", "|---|---|---|"]
    lines += [f"| {k or 'auto'} | {r['tokens_s']:.0f} | {r['sse_events_s']:.0f} |" for k, r in rows.items()]
    write_results("relay", lines, rows)


if __name__ == "__main__":
    main()
