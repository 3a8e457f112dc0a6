"""ASGI middleware in front of the routes: the access log, API keys, then the request body limit. Their error
bodies come from `adapter.errors` like every other error.

- Access log: one line per request when its response has ended, with its status and duration (a stream's whole
  length). uvicorn's own access log, off (adapter/__main__.py), writes its line as the response starts: for a
  streamed completion, on the way to its first token.

- API keys (off when none are configured): `Authorization: Bearer <key>` on every `/v1/` path except
  `/v1/health/...`; keys are compared in constant time and never logged.
- Body limit: a body over `limit` bytes (by Content-Length, or counted as it arrives when chunked) is answered
  413 before any route sees it. The body is read here and replayed to the route, so the route's own
  disconnect watching (`receive()` after the body) still works.
"""

from __future__ import annotations

import hmac
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.errors import APIError, AuthenticationError, RequestTooLargeError

logger = logging.getLogger("adapter.middleware")
access_logger = logging.getLogger("adapter.access")

OPEN_PREFIXES = ("/v1/health/",)


async def _reply(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await error.response()(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what Starlette answers for an app that raised before its response started

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            host, port = scope.get("client") or ("-", 0)
            path = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
            duration_ms = 1000 * (time.monotonic() - started)
            access_logger.info('%s:%d - "%s %s HTTP/%s" %d %.1f ms', host, port, scope["method"], path,
                               scope.get("http_version", "1.1"), status, duration_ms,
                               extra={"method": scope["method"], "path": path, "status": status,
                                      "duration_ms": round(duration_ms, 1), "client": f"{host}:{port}"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...]):
        self.app = app
        self._keys = tuple(k.encode("utf-8") for k in keys)

    def needs_key(self, path: str) -> bool:
        return bool(self._keys) and path.startswith("/v1/") and not path.startswith(OPEN_PREFIXES)

    def is_valid(self, authorization: bytes | None) -> bool:
        if authorization is None:
            return False
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # Compare with every key (no early exit), each in constant time.
        matches = [hmac.compare_digest(token, key) for key in self._keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.needs_key(scope["path"]):
            if not self.is_valid(_header(scope, b"authorization")):
                logger.info("rejected %s %s: missing or invalid API key", scope.get("method"), scope["path"])
                await _reply(AuthenticationError(), scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _reply(RequestTooLargeError(self.limit), scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.limit:
                await _reply(RequestTooLargeError(self.limit), scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
