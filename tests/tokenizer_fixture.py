"""A small SentencePiece-style checkpoint tokenizer (BPE with byte fallback), trained at test time."""

from __future__ import annotations

import collections
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

# Frequent lines put their characters in the vocabulary; the last line's characters that appear nowhere else
# (Æ, ø, 漢, 字, 한, 국, 어, 😀, 🚀) are only reachable through byte fallback.
CORPUS = (
    ["The quick brown fox jumps over the lazy dog."] * 50
    + ["Paris is the capital of France, and the city of lights."] * 30
    + ["Hello world! Hello there, how are you today?"] * 30
    + ["café naïve résumé über façade"] * 20
    + ["中文 中文 日本 日本語"] * 10
    + ["🚀 rocket 😀 漢字 한국어 Ærø"]
)
RARE_CHARACTERS = "Æø漢字한국어😀🚀"


def make_sentencepiece_tokenizer(directory: Path, prepend_scheme: str = "first") -> Path:
    """Writes tokenizer.json, tokenizer_config.json, generation_config.json and config.json; returns directory.

    prepend_scheme "first" is Llama-style (a "▁" dummy prefix, stripped again by the decoder); "never" is
    Gemma-style (no dummy prefix, decoder Replace + ByteFallback + Fuse only).
    """
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_scheme == "first":
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)

    # The alphabet keeps only characters seen more than once, so the rare ones stay out of the vocabulary.
    counts = collections.Counter(c for line in CORPUS for c in line.replace(" ", "▁"))
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,  # fixes their ids: specials 0-5, bytes 6-261
        limit_alphabet=sum(1 for n in counts.values() if n > 1),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    # As in Gemma's and Llama's tokenizer.json: encoding adds BOS.
    bos_id = SPECIAL_TOKENS.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
    )

    # The trainer registers every token it was given as special; byte pieces must be ordinary vocabulary
    # entries (as in Gemma's tokenizer.json), or skip_special_tokens would drop them when decoding.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")

    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 1000000000000000019884624838656,
        "clean_up_tokenization_spaces": False,
    }
    files = {
        "tokenizer_config.json": tokenizer_config,
        # Like Gemma 3 instruction models: turns end with <end_of_turn>, listed only here.
        "generation_config.json": {"bos_token_id": 2, "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]]},
        "config.json": {"bos_token_id": 2, "eos_token_id": ids["<eos>"], "pad_token_id": 0},
    }
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    return directory
