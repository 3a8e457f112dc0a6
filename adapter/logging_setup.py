"""One line per event: `time level logger message`, or a JSON object per line with NIM_JSONL_LOGGING=1.

uvicorn runs with `log_config=None`, so its loggers propagate here too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

# LogRecord's own attributes: anything else on a record came from `extra=` and goes into the JSON line.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
_RECORD_FIELDS |= {"message", "asctime", "taskName", "color_message"}  # uvicorn adds color_message


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info)
        return line.replace("\r", "\\r").replace("\n", "\\n")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def configure_logging(level: str | None = None, jsonl: bool | None = None) -> None:
    """Set up the root logger; arguments left out come from NIM_LOG_LEVEL and NIM_JSONL_LOGGING."""
    level = level or os.environ.get("NIM_LOG_LEVEL", "INFO")
    jsonl = _env_flag("NIM_JSONL_LOGGING") if jsonl is None else jsonl
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if jsonl else OneLineFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
