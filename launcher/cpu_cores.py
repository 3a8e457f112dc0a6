"""Cores of the engine's own (ENGINE_CPU_CORES): the engine computes there and the rest of the service elsewhere.

The engine keeps every core it computes on busy, and Triton, the adapter and the clients each wake for a moment
per streamed response; on the engine's cores each such moment stalls a decode step, since an OpenMP barrier
waits for the preempted thread. With cores of its own the engine's decode thread pins itself (and so the
OpenMP workers it starts) to them, and the launcher confines every other thread of the service to the other
cores, as vLLM's CPU backend reserves cores with VLLM_CPU_OMP_THREADS_BIND.

Triton and its models' processes still start with all the cores, and are confined once the engine is placed:
GNU OpenMP counts the CPUs it may use when torch loads it, and one that counted fewer than the engine's threads
would stop spin-waiting between parallel regions. The adapter starts on the other cores.
"""

from __future__ import annotations

import os
import re

MAX_CPU = 1 << 16  # beyond any machine's core numbers; keeps a mistyped range from filling memory


def parse_cpu_list(text: str) -> frozenset[int]:
    """The kernel's CPU list format ("0-3,6") as core numbers; ValueError when malformed or empty."""
    malformed = ValueError(f"not a CPU list: {text!r} (expected core numbers and ranges, e.g. 0-3,6)")
    cores: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if match is None:
            raise malformed
        first, last = int(match[1]), int(match[2] or match[1])
        if not first <= last < MAX_CPU:
            raise malformed
        cores.update(range(first, last + 1))
    return frozenset(cores)


def split_cores(text: str) -> tuple[frozenset[int], frozenset[int]]:
    """(the engine's cores, the other cores this process may use) for ENGINE_CPU_CORES=`text`; ValueError when
    the engine's are not all usable here or leave none for the rest of the service."""
    allowed = frozenset(os.sched_getaffinity(0))
    engine = parse_cpu_list(text)
    if not engine <= allowed:
        raise ValueError(f"ENGINE_CPU_CORES={text}: this process may use only cores {sorted(allowed)}")
    if not allowed - engine:
        raise ValueError(f"ENGINE_CPU_CORES={text} leaves no core for Triton and the adapter")
    return engine, allowed - engine


def confine(pids, engine: frozenset[int], rest: frozenset[int]) -> None:
    """Move every thread of `pids` to the `rest` cores, except the engine's: threads already pinned within its
    cores. Threads started later inherit their starter's cores."""
    for pid in pids:
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # a process that just ended
        for thread in threads:
            try:
                if not os.sched_getaffinity(thread) <= engine:
                    os.sched_setaffinity(thread, rest)
            except OSError:
                continue  # a thread that just ended
