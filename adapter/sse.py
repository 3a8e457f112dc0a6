"""Server-sent events as OpenAI sends them: `data: <compact JSON>\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

No `event:` lines and no comment pings. An error after the response has started (status 200 already sent)
goes out as one `data: {"error": ...}` event before `[DONE]`, as vLLM does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from adapter.errors import APIError, openai_error

logger = logging.getLogger("adapter.sse")

DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


# A JSON string as pydantic-core writes one in model_dump_json: the same escapes, non-ASCII kept as UTF-8 (tested
# for every code point). A str with a lone surrogate, which pydantic refuses, is left to pydantic (TextEvents).
_json_string = json.JSONEncoder(ensure_ascii=False).encode
_PLACEHOLDER = "\U0010fffd\ue000"  # private-use code points, which no id, model name or fingerprint holds


class TextEvents:
    """The events of a stream that differ only in one text (the text deltas, one per choice index), rendered
    without pydantic: `build(index, placeholder)` goes through `sse_event` once per index, and each event is then
    head + JSON of the text + tail, the same str as `sse_event(build(index, text))`. Why: a pydantic chunk and its
    model_dump_json cost ~25 us an event warm, ~110-130 us cold (as between tokens); the template ~3 us, ~12-30 us."""

    def __init__(self, build: Callable[[int, str], BaseModel]):
        self.build = build
        self.templates: dict[int, tuple[str, str] | None] = {}  # None: the placeholder is not once in the event

    def __call__(self, index: int, text: str) -> str:
        if index in self.templates:
            template = self.templates[index]
        else:
            parts = sse_event(self.build(index, _PLACEHOLDER)).split(_json_string(_PLACEHOLDER))
            template = self.templates[index] = (parts[0], parts[1]) if len(parts) == 2 else None
        if template is None or not (text.isascii() or _utf8(text)):
            return sse_event(self.build(index, text))
        return template[0] + _json_string(text) + template[1]


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


async def sse_stream(chunks: AsyncIterator[BaseModel | dict[str, Any] | str]) -> AsyncIterator[str]:
    """Each chunk is a model or dict for `sse_event`, or a str: an event already rendered (by `TextEvents`)."""
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                yield chunk if isinstance(chunk, str) else sse_event(chunk)
        except APIError as exc:
            logger.warning("stream ended by error %s: %s", exc.status_code, exc.message)
            yield sse_event(exc.body())
        except Exception:  # noqa: BLE001 - the client gets an error event, the log gets the details
            logger.exception("stream failed")
            yield sse_event(openai_error(500, "Internal server error.", "server_error", code="internal_error"))
    yield DONE


class EventStreamResponse(Response):
    """Streams the events in the request's own task, while a plain asyncio task waits for the client to go away and
    then cancels the stream (closing the events, and so the engine request). Starlette's `StreamingResponse` does
    the same with an anyio task group of two tasks per response, which cost ~0.3 ms of each first token here."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        # As StreamingResponse: no body, so no Content-Length.
        self.status_code, self.background, self.events = 200, None, events
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with aclosing(self.events):
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone or streaming.uncancel():
                raise  # cancelled from outside (shutdown), not by the watcher
        finally:
            watcher.cancel()


def sse_response(chunks: AsyncIterator[BaseModel | dict[str, Any] | str]) -> EventStreamResponse:
    return EventStreamResponse(sse_stream(chunks))
