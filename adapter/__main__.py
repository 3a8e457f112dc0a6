"""`python -m adapter`: the OpenAI API on 0.0.0.0:NIM_SERVER_PORT."""

from __future__ import annotations

import os

# gRPC's EventEngine client reads each Triton response on a thread of its own and then wakes the thread that polls
# completions for asyncio: one more thread woken per streamed token, ~0.3 ms of CPU on the cores the engine computes
# on. Without it the polling thread reads the socket itself. Set before grpc is imported; a user's value wins.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")

import uvicorn  # noqa: E402

from adapter.app import create_app  # noqa: E402
from adapter.logging_setup import configure_logging  # noqa: E402
from adapter.settings import Settings  # noqa: E402


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level, settings.jsonl_logging)
    uvicorn.run(
        create_app(settings, freeze_heap=True),
        host="0.0.0.0",
        port=settings.server_port,
        log_config=None,  # our handlers, one line per event
        access_log=False,  # ours, at each response's end (adapter.middleware.AccessLogMiddleware)
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
