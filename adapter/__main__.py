"""`python -m adapter`: the OpenAI API on 0.0.0.0:NIM_SERVER_PORT."""

from __future__ import annotations

import uvicorn

from adapter.app import create_app
from adapter.logging_setup import configure_logging
from adapter.settings import Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level, settings.jsonl_logging)
    uvicorn.run(
        create_app(settings, freeze_heap=True),
        host="0.0.0.0",
        port=settings.server_port,
        log_config=None,  # our handlers, one line per event
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
