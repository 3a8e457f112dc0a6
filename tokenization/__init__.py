"""Text processing shared by the Triton models and the OpenAI adapter: tokenizer, detokenizer, stops, templates."""

from tokenization.chat_template import ChatTemplateError, render_chat
from tokenization.detokenizer import IncrementalDetokenizer
from tokenization.postprocess import DecodeStep, StreamDecoder
from tokenization.stop_strings import StopStringMatcher
from tokenization.tokenizer import Tokenizer

__all__ = [
    "ChatTemplateError",
    "DecodeStep",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "StreamDecoder",
    "Tokenizer",
    "render_chat",
]
