"""The default model (Gemma 3 270M) converts into a working Hugging Face checkpoint.

Slow the first time (about 2 minutes to convert the GGUF), then cached under ``.cache/models/gemma-3-270m``
(or ``$NIM_CACHE_PATH/models/gemma-3-270m``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from build.default_model import (  # noqa: E402
    FORMAT_VERSION,
    MARKER_FILE,
    default_model_dir,
    ensure_default_model,
    is_complete,
)
from build.gemma_chat_template import GEMMA3_CHAT_TEMPLATE  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
EXPECTED_PREFIX = " the capital of the country of France."
EXPECTED_FULL = (
    " the capital of the country of France. It is the largest city in France and the second largest city in Europe."
)
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    MARKER_FILE,
}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    folder = ensure_default_model()
    assert folder == default_model_dir()
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_folder_layout(model_dir: Path) -> None:
    assert is_complete(model_dir)
    assert EXPECTED_FILES <= {p.name for p in model_dir.iterdir()}
    assert json.loads((model_dir / MARKER_FILE).read_text())["format_version"] == FORMAT_VERSION
    assert not list(model_dir.glob("*.gguf")) and not (model_dir / "_gguf").exists()
    assert (model_dir / "int8" / "weights.safetensors").exists()  # equal to the float32 weights: checked when built
    # No half-finished temp folders beside it.
    assert not list(model_dir.parent.glob(f".{model_dir.name}.tmp-*"))

    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["model_type"] == "gemma3_text"
    assert config["dtype"] == "float32" and config["torch_dtype"] == "float32"
    assert "quantization_config" not in config

    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]
    assert generation["bos_token_id"] == 2 and generation["pad_token_id"] == 0

    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<bos>"
    assert tok_config["eos_token"] == "<eos>"
    assert tok_config["pad_token"] == "<pad>"
    assert tok_config["add_bos_token"] is True
    assert tok_config["chat_template"] == GEMMA3_CHAT_TEMPLATE
    assert (model_dir / "chat_template.jinja").read_text() == GEMMA3_CHAT_TEMPLATE

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        assert "model.embed_tokens.weight" in names
        assert {str(handle.get_slice(n).get_dtype()) for n in names} == {"F32"}


def test_the_engine_reads_every_matrix_as_int8_blocks(model_dir: Path) -> None:
    from engine import int8_weights, native
    from engine.model import Decoder

    if not native.cpu_supported():
        pytest.skip("the int8 kernel needs AVX2 and FMA")
    model = Decoder.from_dir(model_dir, screen_vocab=False)
    weights = [w for layer in model.layers for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w)]
    assert all(isinstance(w, int8_weights.Int8Linear) for w in weights + [model.lm_head_int8])


def test_tokenizer_json_like_gemma(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tok.encode("Hello world").ids == [2, 9259, 1902]
    text = " héllo 日本 👋"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id("<end_of_turn>") == 106
    assert tok.token_to_id("<start_of_turn>") == 105


def test_greedy_generation(model_dir: Path, hf_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.dtype == torch.float32
    inputs = hf_tokenizer(PROMPT, return_tensors="pt")
    assert inputs.input_ids[0, 0].item() == 2  # <bos> added
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = hf_tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert text.startswith(EXPECTED_PREFIX), text


def test_chat_template(hf_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )

    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = hf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    assert rendered == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
    )
    ids = hf_tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[:2] == [2, 105] and ids.count(2) == 1 and ids.count(106) == 3


def test_second_call_is_instant(model_dir: Path) -> None:
    began = time.monotonic()
    assert ensure_default_model() == model_dir
    assert time.monotonic() - began < 2.0
