"""Tests of the tokenization package against a small SentencePiece-style tokenizer trained at test time."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from tests.tokenizer_fixture import RARE_CHARACTERS, make_sentencepiece_tokenizer
from build.gemma_chat_template import GEMMA3_CHAT_TEMPLATE
from tokenization import (
    ChatTemplateError,
    IncrementalDetokenizer,
    StopStringMatcher,
    StreamDecoder,
    Tokenizer,
    render_chat,
)

TEXTS = [
    "Hello world",
    "Paris is the capital of France.",
    "  leading and  double  spaces ",
    "café naïve résumé Ærøskøbing",
    "中文 日本語 漢字 한국어",
    "rocket 🚀 and smile 😀😀 done",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "",
]


@pytest.fixture(scope="session", params=["first", "never"], ids=["llama-style", "gemma-style"])
def tokenizer_dir(request, tmp_path_factory):
    return make_sentencepiece_tokenizer(tmp_path_factory.mktemp(f"sp-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


# --- Tokenizer -------------------------------------------------------------------------------------------------


def test_encode_matches_transformers(tokenizer_dir, tok):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for text in TEXTS:
        assert tok.encode(text) == reference(text)["input_ids"], text
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids), text
    assert tok.vocab_size == len(reference)


def test_bos_added_once(tok):
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert tok.bos_token_id not in tok.encode("Hello world", add_special_tokens=False)
    assert tok.decode(ids) == tok.decode(ids[1:])


def test_bos_from_config_without_post_processor(tokenizer_dir, tmp_path):
    # A tokenizer.json without a post-processor falls back to tokenizer_config's add_bos_token.
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello")[0] == tok.bos_token_id
    assert tok.encode("Hello").count(tok.bos_token_id) == 1


def test_config_values(tok):
    assert tok.bos_token_id == 2 and tok.pad_token_id == 0
    assert tok.bos_token == "<bos>" and tok.eos_token == "<eos>"
    assert tok.eos_token_ids == {1, 5}  # <eos> from the configs and <end_of_turn> from generation_config's list
    assert tok.special_token_ids == {0, 1, 2, 3, 4, 5}
    assert tok.model_max_length is None  # transformers' "no limit" sentinel
    assert tok.chat_template is None


def test_chat_template_sources(tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(chat_template="from config", model_max_length=4096, bos_token={"content": "<bos>"})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [1, 4]}}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == "from config"
    assert tok.model_max_length == 4096
    assert tok.bos_token_id == 2  # AddedToken-dict form
    assert tok.eos_token_ids == {1, 4, 5}
    (tmp_path / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE)
    assert Tokenizer.from_dir(tmp_path).chat_template == GEMMA3_CHAT_TEMPLATE


def test_rare_characters_use_byte_fallback(tok):
    for char in RARE_CHARACTERS:
        ids = tok.encode(char, add_special_tokens=False)
        byte_ids = [i for i in ids if tok.byte_value(i) is not None]
        assert bytes(tok.byte_value(i) for i in byte_ids) == char.encode(), char
        assert tok.decode(ids) == tok.decode(tok.encode(char))
    assert tok.byte_value(tok.encode("e", add_special_tokens=False)[-1]) is None


def test_id_to_token_text(tok):
    capital = tok.encode("the capital", add_special_tokens=False)[-1]
    assert tok.id_to_token_text(capital) == " capital"
    assert tok.decode([capital]) in ("capital", " capital")  # llama-style decoding drops a first token's space
    rocket = tok.encode("🚀", add_special_tokens=False)[-4:]
    assert [tok.id_to_token_text(i) for i in rocket] == ["bytes:\\xf0", "bytes:\\x9f", "bytes:\\x9a", "bytes:\\x80"]
    assert tok.id_to_token_text(6 + 0x41) == "A"  # an ASCII byte token is valid UTF-8 alone
    assert tok.id_to_token_text(5) == "<end_of_turn>"
    for text in ("Hello world", "café"):
        ids = tok.encode(text, add_special_tokens=False)
        assert "".join(tok.id_to_token_text(i) for i in ids).strip() == text


# --- IncrementalDetokenizer ------------------------------------------------------------------------------------


def _stream(tok, ids, chunk_sizes, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens)
    pieces, i = [], 0
    for size in chunk_sizes:
        pieces.append(detok.push(ids[i : i + size]))
        i += size
    pieces.append(detok.push(ids[i:]))
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenizer_token_by_token_matches_decode(tok, skip_special_tokens):
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = _stream(tok, ids, [1] * len(ids), skip_special_tokens)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens), text
        assert all("\ufffd" not in p for p in pieces), text


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenizer_random_sequences(tok, seed, skip_special_tokens):
    rng = random.Random(seed)
    byte_ids = [i for i in range(tok.vocab_size) if tok.byte_value(i) is not None]
    pools = {
        "any": list(range(tok.vocab_size)),
        "bytes": byte_ids,  # mostly invalid UTF-8: every emitted U+FFFD must be real
        "mixed": list(range(tok.vocab_size)) + byte_ids * 2 + [1, 4, 5] * 20,
    }
    for _ in range(60):
        pool = pools[rng.choice(list(pools))]
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 40))]
        if rng.random() < 0.5:  # real text with emoji/CJK split into byte tokens, with random noise inserted
            ids = tok.encode(rng.choice(TEXTS) + rng.choice(TEXTS), add_special_tokens=rng.random() < 0.5) + ids
        chunks = [rng.randint(0, 4) for _ in range(len(ids))]
        expected = tok.decode(ids, skip_special_tokens)
        assert "".join(_stream(tok, ids, chunks, skip_special_tokens)) == expected, ids


def test_detokenizer_holds_split_characters(tok):
    ids = tok.encode("a 😀 b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    emitted = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(emitted) == tok.decode(ids)
    assert any("😀" in p for p in emitted)
    assert not any("\ufffd" in p for p in emitted)
    # Emitted only once the run of byte tokens is closed by the next token.
    first_byte = next(n for n, i in enumerate(ids) if tok.byte_value(i) is not None)
    assert emitted[first_byte : first_byte + 4] == ["", "", "", ""]


def test_detokenizer_emits_real_replacement_characters(tok):
    lone = [6 + 0xE4, tok.encode("x", add_special_tokens=False)[-1]]  # first byte of a 3-byte character, then "x"
    assert "".join(_stream(tok, lone, [1, 1])) == tok.decode(lone) == "\ufffdx"
    truncated = [6 + 0xF0, 6 + 0x9F]  # an emoji cut off by the end of generation
    assert "".join(_stream(tok, truncated, [1, 1])) == tok.decode(truncated) == "\ufffd\ufffd"


def test_detokenizer_window_stays_small(tok):
    # Each step decodes a window of recent tokens, not the whole sequence.
    lengths = []
    decode = tok.decode

    class Recording:
        special_token_ids = tok.special_token_ids
        byte_value = staticmethod(tok.byte_value)

        @staticmethod
        def decode(ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return decode(ids, skip_special_tokens)

    ids = tok.encode(" ".join(TEXTS[:4]) * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(Recording())
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert len(ids) > 400 and max(lengths) <= 12  # a byte run and the tokens around it


# --- StopStringMatcher -----------------------------------------------------------------------------------------


def _run_stops(stops, chunks, include_stop=False):
    matcher = StopStringMatcher(stops, include_stop)
    out, matched = [], None
    for chunk in chunks:
        text, matched = matcher.push(chunk)
        out.append(text)
        if matched is not None:
            break
    else:
        out.append(matcher.flush())
    return "".join(out), matched


def test_stop_across_chunks():
    assert _run_stops(["STOP"], ["Hello S", "T", "OP and more"]) == ("Hello ", "STOP")
    assert _run_stops(["STOP"], ["Hello S", "T", "OP and more"], include_stop=True) == ("Hello STOP", "STOP")
    assert _run_stops(["\n\n"], ["a\n", "\nb"]) == ("a", "\n\n")


def test_stop_holds_back_only_possible_prefixes():
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.push("The answer is 4 <") == ("The answer is 4 ", None)
    assert matcher.push("/ans") == ("", None)
    assert matcher.push("wer!") == ("</answer!", None)  # could no longer be a stop: released
    assert matcher.push("</an") == ("", None)
    assert matcher.flush() == "</an"  # held-back partial stop released at the end


def test_stop_earliest_wins():
    assert _run_stops(["world", "lo"], ["hello world"]) == ("hel", "lo")
    assert _run_stops(["lo", "world"], ["hello world"]) == ("hel", "lo")
    # The first stop to complete wins, however the text was chunked.
    for chunks in (["xyz"], ["x", "y", "z"], ["xy", "z"]):
        assert _run_stops(["xyz", "y"], chunks) == ("x", "y")
    assert _run_stops(["ab", "b"], ["ab"]) == ("", "ab")  # same end: the earlier start


def test_stop_after_match_emits_nothing():
    matcher = StopStringMatcher(["END"], include_stop=True)
    assert matcher.push("done END tail") == ("done END", "END")
    assert matcher.push("more") == ("", "END")
    assert matcher.flush() == ""


def test_empty_and_no_stops():
    assert _run_stops(["", "Z"], ["abc", "def"]) == ("abcdef", None)
    assert _run_stops([], ["abc", ""]) == ("abc", None)
    matcher = StopStringMatcher([""])
    assert matcher.push("x") == ("x", None)


@pytest.mark.parametrize("seed", range(5))
def test_stop_chunking_independent(seed):
    rng = random.Random(seed)
    for _ in range(200):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(0, 3))]
        include = rng.random() < 0.5
        whole = _run_stops(stops, [text], include)
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _run_stops(stops, chunks, include) == whole, (text, stops, chunks)
        out, matched = whole
        if matched is None:
            assert out == text
        elif include:
            assert text.startswith(out) and out.endswith(matched)
        else:
            assert text.startswith(out + matched)


# --- StreamDecoder ---------------------------------------------------------------------------------------------


def test_stream_decoder_stops_across_tokens(tok):
    ids = tok.encode("Paris is the capital of France.", add_special_tokens=False)
    decoder = StreamDecoder(tok, ["capital of"], include_stop_str_in_output=False, skip_special_tokens=True)
    steps = [decoder.push([i], finished=False) for i in ids]
    assert "".join(s.text for s in steps) == "Paris is the "
    stopped = [s for s in steps if s.done]
    assert stopped[0].stop_string == "capital of"
    assert all(s.done and s.text == "" for s in stopped[1:])
    assert decoder.push([1], finished=True) == steps[-1]


def test_stream_decoder_finish_flushes(tok):
    ids = tok.encode("rocket 🚀", add_special_tokens=False) + [1]
    decoder = StreamDecoder(tok, ["rocket 🚀!"], include_stop_str_in_output=False, skip_special_tokens=True)
    steps = [decoder.push(ids[:-1], finished=False), decoder.push(ids[-1:], finished=True)]
    assert steps[0].text == "" and not steps[0].done  # all of it could still be the stop string
    assert steps[1].text == tok.decode(ids) and steps[1].done and steps[1].stop_string is None


def test_stream_decoder_include_stop_and_special_tokens(tok):
    ids = tok.encode("Hello world<end_of_turn>", add_special_tokens=False)
    decoder = StreamDecoder(tok, ["world"], include_stop_str_in_output=True, skip_special_tokens=False)
    text = ""
    for i in ids:
        step = decoder.push([i], finished=False)
        text += step.text
    assert text == tok.decode(ids)[: tok.decode(ids).index("world") + 5] and step.stop_string == "world"
    decoder = StreamDecoder(tok, [], include_stop_str_in_output=False, skip_special_tokens=False)
    assert decoder.push(ids, finished=True).text == tok.decode(ids, skip_special_tokens=False)


# --- chat templates --------------------------------------------------------------------------------------------


def _gemma(messages, **kwargs):
    return render_chat(GEMMA3_CHAT_TEMPLATE, messages, bos_token="<bos>", eos_token="<eos>", **kwargs)


def test_gemma_template_format():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Italy?"}]},
    ]
    assert _gemma(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
        "<start_of_turn>user\nAndItaly?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert _gemma(messages[1:2], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nCapital of France?<end_of_turn>\n"
    )
    system_parts = [{"role": "system", "content": [{"type": "text", "text": "Sys"}]}, messages[1]]
    assert _gemma(system_parts).startswith("<bos><start_of_turn>user\nSys\n\nCapital")


def test_gemma_template_matches_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    conversations = [
        [{"role": "user", "content": "Hi <b>&"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "Q"}]}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is "}],
    ]
    for chat in conversations:
        cont = chat[-1]["role"] == "assistant"
        (expected,), _ = render_jinja_template(
            [chat],
            chat_template=GEMMA3_CHAT_TEMPLATE,
            add_generation_prompt=not cont,
            continue_final_message=cont,
            bos_token="<bos>",
            eos_token="<eos>",
        )
        assert _gemma(chat, add_generation_prompt=not cont, continue_final_message=cont) == expected


def test_continue_final_message():
    messages = [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "Once upon a "}]
    rendered = _gemma(messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered == "<bos><start_of_turn>user\nTell me<end_of_turn>\n<start_of_turn>model\nOnce upon a"
    assert messages[-1]["content"] == "Once upon a "  # the caller's messages are untouched
    parts = [messages[0], {"role": "assistant", "content": [{"type": "text", "text": "Once"}]}]
    assert _gemma(parts, add_generation_prompt=False, continue_final_message=True).endswith("model\nOnce")
    # A template that keeps whitespace keeps the message exactly.
    plain = "{% for m in messages %}[{{ m.role }}]{{ m.content }}[/]{% endfor %}"
    rendered = render_chat(
        plain, messages, add_generation_prompt=False, continue_final_message=True, bos_token="", eos_token=""
    )
    assert rendered == "[user]Tell me[/][assistant]Once upon a "


def test_template_features():
    template = (
        "{{ bos_token }}{{ messages | tojson }}{{ tools | tojson }}{{ extra }}"
        "{% for m in messages %}{% break %}{% endfor %}"  # loopcontrols, as in transformers
    )
    rendered = render_chat(
        template,
        [{"role": "user", "content": "<b>é</b>"}],
        bos_token="<s>",
        eos_token="</s>",
        tools=[{"type": "function"}],
        extra="!",
    )
    assert rendered == '<s>[{"role": "user", "content": "<b>é</b>"}][{"type": "function"}]!'


def test_template_errors():
    user = {"role": "user", "content": "hi"}
    with pytest.raises(ChatTemplateError, match="alternate"):
        _gemma([user, user])
    with pytest.raises(ChatTemplateError, match="Invalid content type"):
        _gemma([{"role": "user", "content": 3}])
    with pytest.raises(ChatTemplateError):
        render_chat("{% for %}", [user], bos_token="", eos_token="")  # syntax error
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages[0].content + 1 }}", [user], bos_token="", eos_token="")
    with pytest.raises(ChatTemplateError):  # the sandbox refuses internals
        render_chat("{{ messages.__class__.__mro__ }}", [user], bos_token="", eos_token="")
    with pytest.raises(ChatTemplateError, match="both"):
        _gemma([user], continue_final_message=True)
    with pytest.raises(ChatTemplateError):
        _gemma([{"role": "assistant", "content": None}], add_generation_prompt=False, continue_final_message=True)
    assert issubclass(ChatTemplateError, ValueError)
