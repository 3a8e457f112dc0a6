"""Server-sent events as OpenAI sends them: `data: <compact JSON>\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

No `event:` lines and no comment pings. An error after the response has started (status 200 already sent)
goes out as one `data: {"error": ...}` event before `[DONE]`, as vLLM does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from adapter.errors import APIError, openai_error

logger = logging.getLogger("adapter.sse")

DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


async def sse_stream(chunks: AsyncIterator[BaseModel | dict[str, Any]]) -> AsyncIterator[str]:
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                yield sse_event(chunk)
        except APIError as exc:
            logger.warning("stream ended by error %s: %s", exc.status_code, exc.message)
            yield sse_event(exc.body())
        except Exception:  # noqa: BLE001 - the client gets an error event, the log gets the details
            logger.exception("stream failed")
            yield sse_event(openai_error(500, "Internal server error.", "server_error", code="internal_error"))
    yield DONE


def sse_response(chunks: AsyncIterator[BaseModel | dict[str, Any]]) -> StreamingResponse:
    return StreamingResponse(
        sse_stream(chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
