"""Peak memory of the running service with its KV cache full: concurrency 32 at the longest context.

    .venv/bin/python -m bench.memory [--concurrency 32] [--context 4096]

Starts the service on the default model sized for --concurrency sequences of --context tokens, sends that
many requests at once, each a prompt of `context - 8` token ids and 8 completion tokens (so every slot of
the cache is written), then reads each process's peak resident set (VmHWM) from /proc. Filling a 4096-token
cache 32 times over is ~130k prompt tokens: several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from pathlib import Path

import httpx

from bench.serve_load import Prompts, bench_cache, write_results
from bench.sse import client_session, run_clients

OUTPUT_TOKENS = 8


def peak_rss_mib(pid: int) -> tuple[str, float]:
    """(command line, VmHWM in MiB) of a live process."""
    name = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return name, int(line.split()[1]) / 1024
    return name, 0.0


def role(command: str) -> str:
    if "triton_python_backend_stub" in command:
        return "model " + next((p.split("/")[-3] for p in command.split() if p.endswith("/model.py")), "?")
    for word in ("tritonserver", "adapter", "launcher"):
        if word in command:
            return word
    return command[:40]


async def fill(url: str, model: str, prompts: Prompts, concurrency: int) -> None:
    async with client_session(concurrency) as client:
        async def one():
            body = {"model": model, "prompt": prompts.take(), "max_tokens": OUTPUT_TOKENS, "temperature": 0,
                    "ignore_eos": True}
            async with client.post(f"{url}/completions", json=body) as reply:
                reply.raise_for_status()
                assert (await reply.json())["usage"]["completion_tokens"] == OUTPUT_TOKENS

        await asyncio.gather(*(one() for _ in range(concurrency)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()

    from build.default_model import ensure_default_model
    from launcher.serve import descendants
    from launcher.stack_process import start_stack, stop_stack

    model_dir = ensure_default_model().resolve()
    prompts = Prompts(model_dir, args.context - OUTPUT_TOKENS)  # different ones: none is copied from the cache
    stack = start_stack(model_dir, bench_cache("bench-memory"), ENGINE_MAX_BATCH_SIZE=str(args.concurrency),
                        ENGINE_MAX_QUEUE_SIZE=str(args.concurrency), NIM_MAX_MODEL_LEN=str(args.context))
    try:
        url = stack.openai_base_url
        model = httpx.get(f"{url}/models").json()["data"][0]["id"]
        service = {stack.process.pid} | descendants(stack.process.pid)
        idle = {pid: peak_rss_mib(pid) for pid in service}
        start = time.perf_counter()
        run_clients(fill(url, model, prompts, args.concurrency))
        seconds = time.perf_counter() - start
        full = {pid: peak_rss_mib(pid) for pid in service}
    finally:
        stop_stack(stack)

    lines = [f"# {platform.machine()}, {os.cpu_count()} cores, model {model_dir.name}, {args.concurrency} requests "
             f"x {args.context} tokens (cache full), filled in {seconds:.0f} s", "",
             "| process | peak RSS MiB, started | peak RSS MiB, cache full |", "|---|---|---|"]
    rows = {}
    for pid, (command, mib) in sorted(full.items(), key=lambda item: -item[1][1]):
        if mib < 1:
            continue
        before = idle.get(pid, ("", float("nan")))[1]
        rows[f"{role(command)} ({pid})"] = {"started_mib": before, "full_mib": mib}
        lines.append(f"| {role(command)} | {before:.0f} | {mib:.0f} |")
    total_before = sum(r["started_mib"] for r in rows.values())
    total_full = sum(r["full_mib"] for r in rows.values())
    lines.append(f"| all | {total_before:.0f} | {total_full:.0f} |")
    write_results("memory", lines, rows)


if __name__ == "__main__":
    main()
