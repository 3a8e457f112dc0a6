"""The adapter's configuration, from the environment (NIM's names where NIM has one)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Construct from the environment (`Settings()`), or by field name in code and tests."""

    model_config = SettingsConfigDict(validate_by_name=True, validate_by_alias=True, extra="ignore")

    served_model_name: str | None = Field(default=None, validation_alias="NIM_SERVED_MODEL_NAME")
    server_port: int = Field(default=8000, validation_alias="NIM_SERVER_PORT")
    max_model_len: int | None = Field(default=None, ge=1, validation_alias="NIM_MAX_MODEL_LEN")
    log_level: str = Field(default="INFO", validation_alias="NIM_LOG_LEVEL")
    jsonl_logging: bool = Field(default=False, validation_alias="NIM_JSONL_LOGGING")
    triton_grpc_url: str = Field(default="localhost:8001", validation_alias="TRITON_GRPC_URL")
    model_dir: Path | None = Field(default=None, validation_alias="MODEL_DIR")  # tokenizer, chat template
    chat_template: Path | None = Field(default=None, validation_alias="NIM_CHAT_TEMPLATE")  # overrides the model's
    triton_model_name: str = Field(default="ensemble", validation_alias="TRITON_MODEL_NAME")
    triton_engine_model_name: str = Field(default="tensorrt_llm", validation_alias="TRITON_ENGINE_MODEL_NAME")
    triton_health_timeout_s: float = Field(default=2.0, gt=0, validation_alias="TRITON_HEALTH_TIMEOUT_S")
    # Triton's Prometheus endpoint (the engine's running/waiting gauges); default: TRITON_METRICS_PORT on localhost.
    triton_metrics_url: str | None = Field(default=None, validation_alias="TRITON_METRICS_URL")
    triton_metrics_port: int = Field(default=8002, validation_alias="TRITON_METRICS_PORT")
    # API keys: none configured means no authentication. Comma-separated, and/or a file with one key per line.
    api_keys: str | None = Field(default=None, validation_alias="NIM_API_KEYS", repr=False)
    api_keys_file: Path | None = Field(default=None, validation_alias="NIM_API_KEYS_FILE")
    max_request_body_bytes: int = Field(default=10 * 2**20, ge=1, validation_alias="NIM_MAX_REQUEST_BODY_BYTES")
    # The ensemble's preprocessing and postprocessing run in the adapter (with MODEL_DIR's tokenizer), which
    # streams from the engine model: one process hop less per streamed response. 0: through Triton's ensemble.
    pipeline_in_adapter: bool = Field(default=True, validation_alias="NIM_PIPELINE_IN_ADAPTER")
    # A streaming client that falls behind gets the engine chunks waiting for it merged into one event.
    sse_coalesce: bool = Field(default=True, validation_alias="NIM_SSE_COALESCE")

    @model_validator(mode="after")
    def _default_model_name(self):
        if not self.served_model_name:
            self.served_model_name = self.model_dir.resolve().name if self.model_dir else "model"
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or "model"

    def resolved_max_model_len(self) -> int | None:
        """NIM_MAX_MODEL_LEN, else the checkpoint's `max_position_embeddings` (config.json), else unknown."""
        if self.max_model_len is not None:
            return self.max_model_len
        return self._model_config_int("max_position_embeddings")

    def resolved_vocab_size(self) -> int | None:
        """The model's vocabulary size (config.json `vocab_size`): the token ids it can produce."""
        return self._model_config_int("vocab_size")

    def _model_config_int(self, key: str) -> int | None:
        if self.model_dir is None:
            return None
        try:
            config = json.loads((self.model_dir / "config.json").read_text())
        except (OSError, ValueError):
            return None
        for section in (config, config.get("text_config") or {}):
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def resolved_triton_metrics_url(self) -> str:
        return self.triton_metrics_url or f"http://127.0.0.1:{self.triton_metrics_port}/metrics"

    def resolved_api_keys(self) -> tuple[str, ...]:
        """The configured keys (NIM_API_KEYS and NIM_API_KEYS_FILE together); empty: authentication is off."""
        keys = [k.strip() for k in (self.api_keys or "").split(",")]
        if self.api_keys_file is not None:
            lines = [line.strip() for line in self.api_keys_file.read_text(encoding="utf-8").splitlines()]
            keys += [line for line in lines if not line.startswith("#")]  # comments allowed in the file
        return tuple(dict.fromkeys(k for k in keys if k))

    def chat_template_override(self) -> str | None:
        return self.chat_template.read_text(encoding="utf-8") if self.chat_template else None
