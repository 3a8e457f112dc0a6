"""Serving load measured with NVIDIA's aiperf, the tool users measure serving speed with.

    .venv/bin/python -m bench.aiperf_load [--url http://host:8000/v1] [--concurrency 1 4 16 32] [--requests-per-level 8]

aiperf lives in its own venv, .cache/aiperf-venv (`make aiperf`, pins in bench/aiperf-requirements.txt), so it
never touches the product's .venv. Without --url this starts the service on the default model, as
bench/serve_load.py does. At each concurrency it runs `aiperf profile` against /v1/completions, streaming,
with synthetic prompts of --input-tokens tokens made with the served model's tokenizer folder (offline) and
--output-tokens tokens with `ignore_eos`, greedy as in bench/serve_load.py. Token counts are the server's usage
(`--use-server-token-count`), so the inter-token latency divides by the tokens the engine made, not by a
re-tokenization of the text. aiperf's exports stay under .cache/bench-aiperf/; the table goes to
bench/results/aiperf.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import httpx

from bench.serve_load import bench_cache, metric_cells, start_load_stack, write_results

REPO = Path(__file__).resolve().parent.parent
AIPERF = REPO / ".cache" / "aiperf-venv" / "bin" / "aiperf"
# With --concurrency alone aiperf 0.13.0's timing manager spins a core while every slot is busy, which on this
# 2-core machine slows the engine several times over. A request rate far above what the service completes, with
# --concurrency as the cap, paces that loop (a freed slot refills within 10 ms) and keeps the same load.
PACING_RATE = 100


def relative(path: Path) -> str:
    return os.path.relpath(path, REPO)


def aiperf_command(args: argparse.Namespace, url: str, model: str, model_dir: Path, concurrency: int,
                   out_dir: Path) -> list[str]:
    requests = max(args.requests_per_level, concurrency)
    return [relative(AIPERF), "profile", "--model", model, "--url", url.removesuffix("/v1"),
            "--endpoint-type", "completions", "--streaming", "--tokenizer", relative(model_dir),
            "--isl", str(args.input_tokens), "--isl-stddev", "0", "--osl", str(args.output_tokens),
            "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{args.output_tokens}",
            "--extra-inputs", "temperature:0", "--use-server-token-count",
            "--concurrency", str(concurrency), "--request-rate", str(PACING_RATE), "--arrival-pattern", "constant",
            # a seed per level: each level's prompts differ from the last one's, which KV cache reuse would find
            "--request-count", str(requests), "--random-seed", str(concurrency),
            "--artifact-dir", relative(out_dir), "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry"]


def run_aiperf(command: list[str], out_dir: Path) -> dict:
    """Runs one aiperf profile (its console output goes to aiperf.log beside the exports); the JSON export."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "aiperf.log"
    # aiperf 0.13.0 in HF offline mode looks a tokenizer folder up as a hub repo id and fails; a folder needs no hub.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with open(log, "wb") as log_file:
        done = subprocess.run(command, check=False, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"aiperf exited with {done.returncode}:\n{log.read_text(errors='replace')[-5000:]}")
    return json.loads((out_dir / "profile_export_aiperf.json").read_text())


def summarize(export: dict) -> dict:
    def metric(tag: str, stat: str) -> float:
        return export.get(tag, {}).get(stat, float("nan"))

    return {
        "requests": metric("request_count", "avg"),
        "ttft_p50_ms": metric("time_to_first_token", "p50"),
        "ttft_p99_ms": metric("time_to_first_token", "p99"),
        "itl_p50_ms": metric("inter_token_latency", "p50"),
        "output_tok_s": metric("output_token_throughput", "avg"),
        "requests_s": metric("request_throughput", "avg"),
        "prompt_tokens": metric("usage_prompt_tokens", "avg"),
        "completion_tokens": metric("usage_completion_tokens", "avg"),
    }


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service's /v1 URL; default: start one")
    parser.add_argument("--model-dir", type=Path, help="the served checkpoint (aiperf's tokenizer folder)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--requests-per-level", type=int, default=8,
                        help="requests at each concurrency (at least the concurrency itself)")
    args = parser.parse_args()
    if not AIPERF.exists():
        sys.exit(f"{relative(AIPERF)} is missing: run `make aiperf` first")

    from build.default_model import ensure_default_model
    from launcher.stack_process import stop_stack

    model_dir = (args.model_dir or ensure_default_model()).resolve()
    out_root = bench_cache("bench-aiperf")
    stack = None
    if args.url:
        url = args.url
    else:
        stack = start_load_stack(model_dir, out_root, max(args.concurrency), args.input_tokens, args.output_tokens)
        url = stack.openai_base_url
    rows, commands = {}, []
    try:
        model = httpx.get(f"{url}/models").json()["data"][0]["id"]
        httpx.post(f"{url}/completions", json={"model": model, "prompt": "Hello", "max_tokens": 8},
                   timeout=300).raise_for_status()  # warm-up
        for n in args.concurrency:
            out_dir = out_root / f"c{n}"
            command = aiperf_command(args, url, model, model_dir, n, out_dir)
            commands.append(shlex.join(command))
            rows[n] = summarize(run_aiperf(command, out_dir))
            print(n, rows[n], flush=True)
    finally:
        if stack:
            stop_stack(stack)

    argv = shlex.join(["python", "-m", "bench.aiperf_load", *sys.argv[1:]])
    header = (f"aiperf, {cpu_model()}, {os.cpu_count()} cores, model {model_dir.name}, "
              f"{args.input_tokens} in / {args.output_tokens} out tokens, ignore_eos, streaming /v1/completions")
    note = (f"Command: `{argv}`; aiperf, one run per concurrency (exports in {relative(out_root)}/c<N>/; "
            "tokens in/out are the server's usage):")
    columns = "concurrency | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | output tok/s | req/s | requests | tokens in/out"
    lines = [f"# {header}", "", note, "", "```", *commands, "```", "",
             f"| {columns} |", "|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {metric_cells(r)} | {r['requests']:.0f} | "
                     f"{r['prompt_tokens']:.0f}/{r['completion_tokens']:.0f} |")
    write_results("aiperf", lines, rows)


if __name__ == "__main__":
    main()
