"""Reading and writing the tensors of one request row (batch dimension 1)."""

from __future__ import annotations

import itertools

import numpy as np

Tensors = dict[str, np.ndarray]


class InvalidRequest(ValueError):
    """Bad input from the client: reported as an error response, never raised out of a model."""


def scalar(inputs: Tensors, name: str, default=None):
    """The single value of an optional [1, 1] (or reshaped [1]) input, or `default` when absent."""
    array = inputs.get(name)
    if array is None or array.size == 0:
        return default
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if hasattr(value, "item") else value


def vector(inputs: Tensors, name: str) -> list:
    """The values of an optional [1, -1] input as a Python list (strings decoded)."""
    array = inputs.get(name)
    if array is None or array.size == 0:
        return []
    values = array.reshape(-1).tolist()
    if array.dtype != np.object_:
        return values  # numbers: tolist() made them Python's already
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]


def one_row(inputs: Tensors) -> None:
    """Every model here serves one sequence per request, as TensorRT-LLM's in-flight batcher does."""
    for name, array in inputs.items():
        if array.ndim and array.shape[0] != 1:
            raise InvalidRequest(f"input '{name}' has batch size {array.shape[0]}; send one sequence per request")


def string_tensor(text: str) -> np.ndarray:
    return np.array([[text.encode("utf-8")]], dtype=np.object_)


def int_tensor(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


def encode_word_lists(words: list[list[int]]) -> np.ndarray:
    """TensorRT-LLM's word-list format: [1, 2, L]: flattened ids, then end offsets padded with -1."""
    flat = [token for word in words for token in word]
    offsets = list(itertools.accumulate(len(word) for word in words))  # numpy's cumsum costs more on a few words
    length = max(len(flat), len(offsets), 1)
    ids = flat + [0] * (length - len(flat))
    ends = offsets + [-1] * (length - len(offsets))
    return np.array([[ids, ends]], dtype=np.int32)


def decode_word_lists(array: np.ndarray | None) -> list[list[int]]:
    """Inverse of encode_word_lists; accepts [2, L] or [1, 2, L]."""
    if array is None or array.size == 0:
        return []
    array = array.reshape(2, -1)
    ids, ends = array[0].tolist(), [int(e) for e in array[1] if e >= 0]
    words, start = [], 0
    for end in ends:
        if end > start:
            words.append(ids[start:end])
        start = end
    return words
