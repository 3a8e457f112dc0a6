"""The service's long-lived Python processes keep what they built at startup out of the garbage collector's way.

A full (generation 2) collection walks every object the collector tracks: in the adapter (~90k: tokenizer,
FastAPI, pydantic) one took 77-112 ms, in the engine model's process (~170k: torch) 190 ms, and every stream
waits that long. What a process holds once it has started lives as long as the process, so `gc.freeze()` moves
it to the permanent generation, which collections skip, as vLLM does after its warm-up. Objects made later are
collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is left; returns how many objects the collector now skips."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
