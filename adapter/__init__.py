"""OpenAI-compatible HTTP API (NIM-style) in front of Triton's `ensemble` model."""

from importlib import metadata as _metadata
from pathlib import Path as _Path


def _version() -> str:
    try:
        return _metadata.version("triton-llm-nim")
    except _metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        pyproject = _Path(__file__).resolve().parent.parent / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "0.0.0"


__version__ = _version()
API_VERSION = "1.0.0"  # NIM's /v1/version `api`
