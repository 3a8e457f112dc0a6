"""Fixtures that start the real product: `python -m launcher` (tritonserver + the adapter) on free ports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from launcher.stack_process import start_stack, stop_stack

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from build.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory, default_model_dir) -> Path:
    """Gemma 3 architecture with random weights and the real Gemma 3 tokenizer: fast, real text paths."""
    from tests.engine_checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint("gemma3", tmp_path_factory.mktemp("tiny") / "tiny-gemma3", vocab_size=262144)
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).exists():
            shutil.copy2(default_model_dir / name, path / name)
    shutil.copy2(default_model_dir / "generation_config.json", path / "generation_config.json")
    return path


@pytest.fixture(scope="session")
def tiny_stack(tiny_gemma_dir, tmp_path_factory):
    stack = start_stack(tiny_gemma_dir, tmp_path_factory.mktemp("tiny-stack"), NIM_MAX_MODEL_LEN="256")
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="session")
def default_stack(default_model_dir, tmp_path_factory):
    stack = start_stack(default_model_dir, tmp_path_factory.mktemp("default-stack"), NIM_MAX_MODEL_LEN="1024")
    yield stack
    stop_stack(stack)
