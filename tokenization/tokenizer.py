"""The one place that loads a checkpoint's tokenizer: tokenizer.json plus the config files around it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors

# transformers writes this for "no limit" (VERY_LARGE_INTEGER); treat anything that large as unset.
_NO_MAX_LENGTH = int(1e29)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    # Older tokenizer_config.json files store special tokens as serialized AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _ids(value: Any) -> set[int]:
    # eos_token_id is an int in some configs and a list in others (Gemma 3: [1, 106]).
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    # Same precedence as transformers: a standalone chat_template.jinja overrides the config entry.
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    if template is None:
        # Multimodal checkpoints (Gemma 3) keep the template in the processor's chat_template.json.
        template = _read_json(directory / "chat_template.json").get("chat_template")
    return template


class Tokenizer:
    """A Hugging Face checkpoint's tokenizer, encoding and decoding as transformers' AutoTokenizer does."""

    def __init__(
        self,
        backend: _HFTokenizer,
        tokenizer_config: dict[str, Any],
        generation_config: dict[str, Any],
        model_config: dict[str, Any],
        chat_template: str | None,
    ):
        self._tok = backend
        self.bos_token: str | None = _token_content(tokenizer_config.get("bos_token"))
        self.eos_token: str | None = _token_content(tokenizer_config.get("eos_token"))
        self.pad_token: str | None = _token_content(tokenizer_config.get("pad_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.pad_token_id = self._id_of(self.pad_token)
        self.chat_template = chat_template
        max_length = tokenizer_config.get("model_max_length")
        self.model_max_length: int | None = (
            int(max_length) if max_length is not None and max_length < _NO_MAX_LENGTH else None
        )

        # Generation stops on any of them: Gemma's instruction models end turns with <end_of_turn>, which only
        # generation_config/config list, while tokenizer_config names <eos>.
        text_config = model_config.get("text_config") or {}
        self.eos_token_ids: set[int] = (
            _ids(self._id_of(self.eos_token))
            | _ids(generation_config.get("eos_token_id"))
            | _ids(model_config.get("eos_token_id"))
            | _ids(text_config.get("eos_token_id"))
        )

        added = backend.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        # SentencePiece byte-fallback pieces ("<0xE4>"): raw bytes of characters missing from the vocabulary.
        self._byte_of: dict[int, int] = {
            i: byte for byte in range(256) if (i := backend.token_to_id(f"<0x{byte:02X}>")) is not None
        }
        # Includes added tokens, like len(AutoTokenizer): every id the model may produce decodes.
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

        # tokenizer.json's post-processor decides which special tokens encode() adds (transformers 5 ignores
        # add_bos_token then), so BOS is added exactly once. Without one, follow add_bos_token/add_eos_token as
        # transformers 4 did, rather than silently dropping the BOS the model was trained with.
        if backend.post_processor is None:
            self._set_post_processor(
                bool(tokenizer_config.get("add_bos_token")) and self.bos_token_id is not None,
                bool(tokenizer_config.get("add_eos_token")) and self._id_of(self.eos_token) is not None,
            )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        directory = Path(path)
        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        return cls(
            _HFTokenizer.from_file(str(directory / "tokenizer.json")),
            tokenizer_config,
            _read_json(directory / "generation_config.json"),
            _read_json(directory / "config.json"),
            _chat_template(directory, tokenizer_config),
        )

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.bos_token, self.eos_token
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = ([(bos, self.bos_token_id)] if add_bos else []) + (
            [(eos, self._id_of(eos))] if add_eos else []
        )
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def byte_value(self, token_id: int) -> int | None:
        """The raw byte a byte-fallback token stands for, else None."""
        return self._byte_of.get(token_id)

    def id_to_token_text(self, token_id: int) -> str:
        """One token's text as OpenAI logprobs show it: " Paris", "<end_of_turn>", or "bytes:\\xe4"."""
        byte = self.byte_value(token_id)
        if byte is not None and byte >= 0x80:
            # Part of a multi-byte character: no text of its own, so show the byte as vLLM does.
            return f"bytes:\\x{byte:02x}"
        # Decoding the token twice and keeping the second copy shows it mid-text: decoders that drop the
        # leading space of the first token (Metaspace, Strip) would otherwise turn " Paris" into "Paris".
        once = self._tok.decode([token_id], skip_special_tokens=False)
        twice = self._tok.decode([token_id, token_id], skip_special_tokens=False)
        return twice[len(once) :]
