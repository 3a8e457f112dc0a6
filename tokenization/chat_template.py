"""Chat templates: render a conversation to a prompt with a checkpoint's Jinja template, as transformers does."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Appended to the final message's text so its end can be found in the rendered prompt (transformers' marker).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered with this chat template."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates ship with checkpoints, i.e. are untrusted code: hence the immutable sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _tag_final_message(messages: list[dict]) -> str:
    # Appends the marker to the final message's (last) text and returns that text, as transformers does.
    content = messages[-1].get("content")
    if isinstance(content, str):
        messages[-1]["content"] = content + _CONTINUE_TAG
        return content
    for part in reversed(content or []):
        if isinstance(part, dict) and "text" in part:
            text = part["text"]
            part["text"] = text + _CONTINUE_TAG
            return text
    raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    bos_token: str | None,
    eos_token: str | None,
    tools: list[dict] | None = None,
    **template_kwargs: Any,
) -> str:
    """Renders messages to prompt text; with continue_final_message the prompt ends inside the final message."""
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set")
    if continue_final_message and not messages:
        raise ChatTemplateError("continue_final_message is set but there are no messages")
    messages = copy.deepcopy(messages)  # the continuation marker must not leak into the caller's messages
    final_text = _tag_final_message(messages) if continue_final_message else None
    try:
        rendered = _compile(template).render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **template_kwargs,
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e
    except Exception as e:  # template code indexing or adding the wrong types, e.g. content=None
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e
    if final_text is None:
        return rendered
    if final_text.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
        raise ChatTemplateError("continue_final_message: the template does not render the final message's text")
    cut = rendered.rindex(_CONTINUE_TAG.strip())
    if rendered.startswith(_CONTINUE_TAG, cut):
        return rendered[:cut]
    # The template trimmed the text after the marker (Gemma's `| trim`), so the message's own trailing whitespace
    # may be gone from the prompt too: cut whitespace before the marker, as transformers does.
    return rendered[:cut].rstrip()
