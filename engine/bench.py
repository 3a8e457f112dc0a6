"""Decode throughput: `python -m engine.bench CHECKPOINT_DIR [--streams 1 16] [--prompt 32] [--tokens 64]`.

Prints output tokens/s for each number of concurrent streams (greedy, end ids ignored), prefill included.
"""

import argparse
import threading
import time

import torch

from .engine import Engine
from .params import SamplingParams


def run(engine: Engine, streams: int, prompt_len: int, new_tokens: int) -> float:
    vocab = engine.config.vocab_size
    done = threading.Semaphore(0)
    counts = [0] * streams

    def callback(i):
        def on_output(out):
            counts[i] = out.num_output_tokens
            if out.finished:
                done.release()

        return on_output

    start = time.perf_counter()
    for i in range(streams):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
        engine.submit(f"bench-{streams}-{i}", prompt, SamplingParams(new_tokens, temperature=0.0), callback(i))
    for _ in range(streams):
        done.acquire()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    with Engine(
        args.checkpoint, max_batch_size=max(args.streams), max_seq_len=args.prompt + args.tokens,
        num_threads=args.threads,
    ) as engine:
        run(engine, 1, args.prompt, 4)  # warm-up
        for streams in args.streams:
            print(f"{streams:3d} streams: {run(engine, streams, args.prompt, args.tokens):8.1f} output tokens/s")


if __name__ == "__main__":
    main()
