"""The Triton steps' logic without Triton, with the real Gemma 3 tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from engine import GenerationOutput
from pipeline import engine_io
from pipeline.context import RequestContext
from pipeline.postprocess import Postprocessor
from pipeline.preprocess import Preprocessor
from pipeline.tensors import InvalidRequest, decode_word_lists, encode_word_lists, int_tensor, string_tensor
from tokenization.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def test_word_lists_round_trip():
    words = [[5], [7, 8, 9], [10, 11]]
    encoded = encode_word_lists(words)
    assert encoded.tolist() == [[[5, 7, 8, 9, 10, 11], [1, 4, 6, -1, -1, -1]]]
    assert decode_word_lists(encoded) == words
    assert decode_word_lists(encode_word_lists([])) == []


def test_engine_responses_carry_only_the_outputs_asked_for():
    inputs = {"input_ids": np.array([[2, 651, 6037]], dtype=np.int32), "request_output_len": int_tensor(4)}
    output = GenerationOutput("r1", [7], num_input_tokens=3, num_output_tokens=1)
    everything = engine_io.response_tensors(engine_io.parse_request(inputs, "r1"), output)
    assert set(everything) == {"output_ids", "sequence_length", "num_input_tokens", "num_output_tokens",
                               "request_context"}
    asked = engine_io.parse_request(inputs, "r1", ["output_ids", "num_output_tokens", "finish_reason"])
    assert set(engine_io.response_tensors(asked, output)) == {"output_ids", "num_output_tokens"}
    last = GenerationOutput("r1", [8], finished=True, finish_reason="length", num_input_tokens=3, num_output_tokens=2)
    assert set(engine_io.response_tensors(asked, last)) == {"output_ids", "num_output_tokens", "finish_reason"}


def test_preprocess_tokenizes_and_turns_extra_end_ids_into_stop_words(tokenizer):
    pre = Preprocessor(tokenizer, max_seq_len=64)
    out = pre({"QUERY": string_tensor("Hello world"), "REQUEST_OUTPUT_LEN": int_tensor(8),
               "STOP_TOKEN_IDS": np.array([[42]], dtype=np.int32), "STOP_WORDS_DICT": string_tensor("\n\n")}, "r1")
    prompt = out["INPUT_ID"][0].tolist()
    assert prompt == tokenizer.encode("Hello world") and prompt[0] == tokenizer.bos_token_id
    assert out["OUT_END_ID"][0, 0] == 1  # <eos>
    assert decode_word_lists(out["STOP_WORDS_IDS"]) == [[106], [42]]  # <end_of_turn>, then the client's
    context = RequestContext.from_json(out["REQUEST_CONTEXT"][0, 0].decode())
    assert context.key == "r1" and context.stop == ["\n\n"]


def test_preprocess_ignore_eos_and_context_limit(tokenizer):
    pre = Preprocessor(tokenizer, max_seq_len=16)
    out = pre({"QUERY": string_tensor("Hi"), "REQUEST_OUTPUT_LEN": int_tensor(4),
               "IGNORE_EOS": np.array([[True]])}, "")
    assert out["OUT_END_ID"][0, 0] == -1 and decode_word_lists(out["STOP_WORDS_IDS"]) == []
    assert RequestContext.from_json(out["REQUEST_CONTEXT"][0, 0].decode()).key  # made up when the client sent none
    with pytest.raises(InvalidRequest, match=r"maximum context length is 16 tokens.*\(2 in the prompt, 20 for"):
        pre({"QUERY": string_tensor("Hi"), "REQUEST_OUTPUT_LEN": int_tensor(20)}, "")
    unlimited = pre({"QUERY": string_tensor("Hi"), "REQUEST_OUTPUT_LEN": int_tensor(0)}, "")
    assert unlimited["REQUEST_OUTPUT_LEN_OUT"][0, 0] == 16 - 2


def engine_response(context: RequestContext, token_ids: list[int], finish_reason: str = "") -> dict:
    return {
        "TOKENS_BATCH": np.array([[token_ids]], dtype=np.int32),
        "SEQUENCE_LENGTH": np.array([[len(token_ids)]], dtype=np.int32),
        "FINISH_REASON": string_tensor(finish_reason),
        "REQUEST_CONTEXT": string_tensor(context.to_json()),
    }


def byte_fallback_text(tokenizer: Tokenizer) -> str:
    """Characters Gemma's vocabulary lacks, so they are spelled as UTF-8 byte tokens."""
    for char in "𝔘ꙮ𓀀🜁𐍈":
        ids = tokenizer.encode(char, add_special_tokens=False)
        if len(ids) > 1:
            return f" café {char} 日本語{char}"
    pytest.skip("no byte-fallback character found")


def test_postprocess_streams_exact_text_one_token_at_a_time(tokenizer):
    text = byte_fallback_text(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    post = Postprocessor(tokenizer, stop_engine=lambda key: pytest.fail("no stop string here"))
    context = RequestContext(key="s1")
    chunks = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        out = post(engine_response(context, [token], "length" if last else ""))
        chunks.append(out["OUTPUT"][0, 0].decode("utf-8"))
    assert "".join(chunks) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    assert post.streams == {}  # state is dropped with the final response


def test_postprocess_stop_string_across_chunks_stops_the_engine_once(tokenizer):
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    stopped = []
    post = Postprocessor(tokenizer, stop_engine=stopped.append)
    context = RequestContext(key="s2", stop=["three f"])
    texts, reasons = [], []
    for token in ids:
        out = post(engine_response(context, [token]))
        texts.append(out["OUTPUT"][0, 0].decode())
    final = post(engine_response(context, [], "cancelled"))
    assert "".join(texts) == "one two "
    assert stopped == ["s2"]
    assert final["OUT_FINISH_REASON"][0, 0] == b"stop" and final["OUT_STOP_REASON"][0, 0] == b"three f"


def test_postprocess_drops_the_stop_token_text_unless_asked(tokenizer):
    ids = tokenizer.encode("alpha beta", add_special_tokens=False)
    post = Postprocessor(tokenizer, stop_engine=lambda key: None)
    final = engine_response(RequestContext(key="s3"), ids, "stop")
    final["STOP_REASON"] = string_tensor(str(ids[-1]))
    assert post(final)["OUTPUT"][0, 0].decode() == "alpha"
    final["REQUEST_CONTEXT"] = string_tensor(RequestContext(key="s4", include_stop_str_in_output=True).to_json())
    assert post(final)["OUTPUT"][0, 0].decode() == "alpha beta"
