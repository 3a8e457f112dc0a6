"""OpenAI's error envelope, our typed errors, and the FastAPI handlers: the error body is built here only.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}`. Bad input is 400, never 500
(the OpenAI SDKs retry 5xx); 429 and 503 carry `Retry-After`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("adapter.errors")

RETRY_AFTER_S = 1


def openai_error(status: int, message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    """The one builder of OpenAI's error body. `status` is accepted for symmetry with the response; the body
    itself does not carry it."""
    del status
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(openai_error(status, message, type, param, code), status_code=status, headers=headers)


class APIError(Exception):
    """An error with its HTTP status and OpenAI `type`/`code`; raised anywhere, rendered by the handler."""

    status_code: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers

    def body(self) -> dict:
        return openai_error(self.status_code, self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class BadRequestError(APIError):
    """Bad input: our validation, or the engine's (e.g. the prompt is longer than the context)."""

    status_code = 400
    type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    """The prompt (plus max_tokens) does not fit the context; the serving layer names the prompt's param."""

    code = "context_length_exceeded"


class AuthenticationError(APIError):
    """No API key, or not one of the configured keys (OpenAI's shape; the key itself is never echoed)."""

    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "Incorrect API key provided. Send it as `Authorization: Bearer <key>`."):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class RequestTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")


class ModelNotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.", param="model")


class EngineOverloadedError(APIError):
    """The engine's queue is full: the client should come back shortly."""

    status_code = 429
    type = "rate_limit_error"
    code = "engine_overloaded"

    def __init__(self, message: str = "The server is busy; retry shortly.", *, retry_after: int = RETRY_AFTER_S):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class EngineUnavailableError(APIError):
    """Triton is down, or the ensemble is not loaded."""

    status_code = 503
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str = "The inference server is not available.", *, retry_after: int = RETRY_AFTER_S):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class EngineInternalError(APIError):
    """The engine failed for a reason that is not the client's; the details go to the log, not the client."""

    status_code = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str = "The inference server failed to process the request."):
        super().__init__(message)


# --- request validation -------------------------------------------------------------------------------------


def param_from_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """Pydantic's error location as OpenAI's `param`: ("body", "messages", 0, "role") -> "messages[0].role"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # Pydantic names the member of a union that failed ("str", "list[...]", "function-after[...]"): not a field.
    parts = [p for p in parts if not (isinstance(p, str) and (p.endswith("]") or p in _UNION_TAGS))]
    param = ""
    for part in parts:
        if isinstance(part, int):
            param += f"[{part}]"
        else:
            param += f".{part}" if param else str(part)
    return param or None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_message(error: dict) -> str:
    msg = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if error.get("type") == "json_invalid":
        return "The request body is not valid JSON."
    if error.get("type") == "missing" and (param := param_from_loc(error.get("loc", ()))):
        return f"Missing required parameter: '{param}'."
    param = param_from_loc(error.get("loc", ()))
    return f"{msg} (parameter '{param}')" if param else msg


async def _validation_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    param = None if first.get("type") == "json_invalid" else param_from_loc(first.get("loc", ()))
    if first.get("loc") == ("body",) and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return error_response(400, "The request body must be a JSON object.", "invalid_request_error")
    return error_response(400, validation_message(first), "invalid_request_error", param=param)


async def _api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    if exc.status_code >= 500:
        logger.warning("request failed: %s %s", exc.status_code, exc.message)
    return exc.response()


_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


async def _http_handler(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = _HTTP_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error")
    return error_response(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))


async def _unhandled_handler(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "Internal server error.", "server_error", code="internal_error")


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled_handler)
