"""KV cache reuse (prefix caching) through the whole stack: time to first token of a chat's later turns, and
of questions about one document, on two stacks that differ only in NIM_ENABLE_KV_CACHE_REUSE, in one run.

    .venv/bin/python -m bench.prefix_reuse [--turns 6] [--document-facts 60]

Each request goes to the stack with reuse, then the same messages to the one without, one at a time
(streamed /v1/chat/completions, greedy, 32 tokens). The chat's history is the reusing stack's answers, so
both stacks see the same messages. Writes bench/results/prefix_reuse.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import aiohttp
import httpx

from bench.serve_load import RESULTS, bench_cache
from bench.sse import client_session, run_clients, sse_chunks

ANSWER_TOKENS = 32
CONTEXT = 4096


def facts(count: int, topic: str) -> str:
    return " ".join(
        f"Fact {i} about {topic}: station {i} records {3 * i + 7} millimetres of rain in spring and "
        f"{5 * i % 41 + 12} in autumn, and its well is {i % 9 + 2} metres deep." for i in range(1, count + 1)
    )


async def ask(client: aiohttp.ClientSession, url: str, model: str, messages: list[dict]) -> tuple[float, str, int]:
    """Time to first token, the answer, and the prompt's token count."""
    body = {"model": model, "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, text, prompt_tokens = None, [], 0
    async with client.post(f"{url}/chat/completions", json=body) as reply:
        async for chunk in sse_chunks(reply):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text.append(chunk["choices"][0]["delta"]["content"])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return (first or time.perf_counter()) - start, "".join(text), prompt_tokens


async def compare(urls: dict[str, str], model: str, conversations: list[list[dict]], follow_ups: bool) -> list[dict]:
    """Each conversation on every stack in turn; with `follow_ups`, one conversation whose user turns are
    `conversations`' last messages, each answer joining the history."""
    rows = []
    async with client_session() as client:
        history: list[dict] = []
        for messages in conversations:
            sent = history + messages if follow_ups else messages
            row, answers = {}, []
            for name, url in urls.items():
                ttft, answer, prompt_tokens = await ask(client, url, model, sent)
                row[name] = ttft
                answers.append(answer)
                row["prompt_tokens"] = prompt_tokens
            row["answer"], row["same_text"] = answers[0], len(set(answers)) == 1
            if follow_ups:
                history = sent + [{"role": "assistant", "content": row["answer"]}]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "answer"}), flush=True)
    return rows


def table(title: str, rows: list[dict]) -> list[str]:
    lines = [f"### {title}", "",
             "| request | prompt tokens | TTFT with reuse ms | TTFT without ms | speed-up | same answer |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['prompt_tokens']} | {1000 * r['reuse']:.0f} | {1000 * r['no reuse']:.0f} | "
                     f"{r['no reuse'] / r['reuse']:.1f}x | {'yes' if r['same_text'] else 'no'} |")
    later = rows[1:]
    if later:
        reuse = statistics.median(r["reuse"] for r in later)
        plain = statistics.median(r["no reuse"] for r in later)
        lines.append(f"| 2-{len(rows)}, median | | {1000 * reuse:.0f} | {1000 * plain:.0f} | {plain / reuse:.1f}x | |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--document-facts", type=int, default=60, help="~30 tokens each")
    args = parser.parse_args()

    from build.default_model import ensure_default_model
    from launcher.stack_process import start_stack, stop_stack

    model_dir = (args.model_dir or ensure_default_model()).resolve()
    stacks = {}
    try:
        for name, reuse in (("reuse", "1"), ("no reuse", "0")):
            stacks[name] = start_stack(model_dir, bench_cache(f"bench-prefix-{reuse}"), ENGINE_MAX_BATCH_SIZE="2",
                                       NIM_MAX_MODEL_LEN=str(CONTEXT), NIM_ENABLE_KV_CACHE_REUSE=reuse)
        urls = {name: stack.openai_base_url for name, stack in stacks.items()}
        model = httpx.get(f"{urls['reuse']}/models").json()["data"][0]["id"]
        warm_up = [[{"role": "user", "content": "Hello."}]]
        run_clients(compare(urls, model, warm_up, follow_ups=False))

        system = {"role": "system", "content": "You answer questions about rain gauges. " + facts(8, "the valley")}
        turns = [[system, {"role": "user", "content": f"What does station {i + 1} record in spring?"}]
                 if i == 0 else [{"role": "user", "content": f"And station {i + 1}?"}] for i in range(args.turns)]
        chat = run_clients(compare(urls, model, turns, follow_ups=True))

        document = facts(args.document_facts, "the plateau")
        questions = [[{"role": "user", "content": f"{document}\n\nHow deep is the well of station {q}?"}]
                     for q in (3, 14, 27, 41, 55)]
        qa = run_clients(compare(urls, model, questions, follow_ups=False))
    finally:
        for stack in stacks.values():
            stop_stack(stack)

    lines = [f"# {platform.machine()}, {os.cpu_count()} cores, model {model_dir.name}, streamed chat completions, "
             f"greedy, {ANSWER_TOKENS} tokens", "",
             *table(f"A chat of {args.turns} turns (each request carries the whole history)", chat),
             *table("Questions about one document (a new single-turn chat each)", qa)]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefix_reuse.md").write_text(text)
    (RESULTS / "prefix_reuse.json").write_text(json.dumps({"chat": chat, "document": qa}, indent=2))


if __name__ == "__main__":
    main()
