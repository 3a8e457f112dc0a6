"""Reading an OpenAI streaming response as the benchmarks' clients do."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx


async def sse_chunks(reply: httpx.Response) -> AsyncIterator[dict]:
    """The JSON chunks of an SSE reply (`data: {...}` lines), up to `data: [DONE]`."""
    reply.raise_for_status()
    async for line in reply.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])
