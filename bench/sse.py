"""The benchmarks' HTTP client, and reading an OpenAI streaming response with it.

aiohttp, as NVIDIA's aiperf uses: measured alternately on this 2-core machine (one-token streaming requests through
the adapter, SYNTHETIC engine), httpx's `AsyncClient` took ~2 ms more to each first token (7.8 against 6.0 ms),
time that is the client's own and not the service's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import aiohttp
import uvloop

T = TypeVar("T")


def run_clients(main: Coroutine[Any, Any, T]) -> T:
    """Runs a benchmark's clients on uvloop's event loop, as aiperf runs its own. On asyncio's, one streamed token
    cost the client 0.34 against 0.28 ms of CPU (5 alternating pairs, paced SYNTHETIC engine): CPU that comes out
    of the two cores the engine computes on, and so out of the stack's measured times."""
    return uvloop.run(main)


def client_session(connections: int = 100) -> aiohttp.ClientSession:
    """Keep-alive connections, no timeouts (a benchmark waits for every answer), and room for long SSE lines."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=None), read_bufsize=1 << 20)


async def sse_chunks(reply: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON chunks of an SSE reply (`data: {...}` lines), up to `data: [DONE]`."""
    reply.raise_for_status()
    async for raw in reply.content:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            yield json.loads(line[6:])
