"""Chat messages -> prompt text -> token ids, through the model's own chat template.

The template is rendered in jinja2's immutable sandbox (it comes from a downloaded file, so
it is treated as untrusted code). The one image of a request is marked by the ``<image>``
placeholder; when no message carries it, it leads the first user turn, as Apple's reference
``predict.py`` does, so a plain question about a photo is still answered about the photo.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ..text import invalid_text, shown
from .exceptions import PromptError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")

Message = dict[str, str]


# --------------------------------------------------------------------------- messages


def _text(value: str, where: str) -> str:
    """`value`, refused when it is not valid text (the tokenizer cannot encode a lone surrogate)."""
    problem = invalid_text(value)
    if problem is not None:
        raise PromptError(f"{where} is not valid text: {problem}")
    return value


def _part_text(part: Any, where: str) -> str:
    """One content part of the OpenAI-like list form: text, or the image's placeholder."""
    if not isinstance(part, Mapping):
        raise PromptError(f"{where} must be an object with a 'type', got {_kind(part)}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise PromptError(f"{where} of type 'text' needs a string 'text'")
        return _text(text, f"{where}.text")
    if kind == "image":
        return IMAGE_PLACEHOLDER
    got = shown(kind) if isinstance(kind, str) else _kind(kind)
    raise PromptError(f"{where} has type {got}; expected 'text' or 'image'")


def _kind(value: Any) -> str:
    """What a JSON value is, for a message that must not echo the value itself."""
    return "nothing" if value is None else f"a JSON {type(value).__name__}"


def normalize_messages(messages: Any) -> list[Message]:
    """Validate messages and flatten list-form content into strings; raises PromptError.

    The one place messages are validated: the request parser calls it before admission, the
    manager again when it renders the prompt (already normalized messages pass unchanged).
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        got = "an empty list" if isinstance(messages, list | tuple) and not messages else _kind(messages)
        raise PromptError(f"messages must be a non-empty list of {{role, content}} objects, got {got}")
    normalized = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise PromptError(f"{where} must be an object with 'role' and 'content', got {_kind(message)}")
        role = message.get("role")
        if role not in ROLES:
            got = shown(role) if isinstance(role, str) else _kind(role)
            raise PromptError(f"{where}.role is {got}; expected one of {', '.join(ROLES)}")
        if "content" not in message:
            raise PromptError(f"{where}.content is missing")
        content = message["content"]
        if isinstance(content, list):
            content = "".join(_part_text(part, f"{where}.content[{i}]") for i, part in enumerate(content))
        elif isinstance(content, str):
            content = _text(content, f"{where}.content")
        else:
            raise PromptError(f"{where}.content must be a string or a list of text/image parts, got {_kind(content)}")
        normalized.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in normalized):
        raise PromptError("messages need at least one message with role 'user'")
    return normalized


def place_image(messages: list[Message], has_image: bool) -> list[Message]:
    """Make sure the image placeholder appears exactly once when there is an image, never otherwise."""
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if not has_image:
        if count:
            raise PromptError(f"the messages contain {IMAGE_PLACEHOLDER} but the request has no image")
        return messages
    if count > 1:
        raise PromptError(f"one image per request: the messages contain {IMAGE_PLACEHOLDER} {count} times")
    if count == 1:
        return messages
    placed = [dict(m) for m in messages]
    first_user = next(m for m in placed if m["role"] == "user")
    first_user["content"] = IMAGE_PLACEHOLDER + "\n" + first_user["content"]
    return placed


# --------------------------------------------------------------------------- template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A model's chat template, compiled once in a sandbox with transformers' conventions."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._special_tokens = dict(special_tokens or {})

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._special_tokens
            )
        except jinja2.exceptions.SecurityError as exc:
            raise PromptError(f"the chat template tried an unsafe operation: {exc}") from exc
        except jinja2.exceptions.TemplateError as exc:
            # Templates reject conversations they cannot express (e.g. roles not alternating).
            raise PromptError(f"the model's chat template rejected the messages: {exc}") from exc


# --------------------------------------------------------------------------- tokens


def encode_prompt(tokenizer: Tokenizer, prompt: str, image_token_id: int, image_tokens: int) -> np.ndarray:
    """Tokenize the rendered prompt and expand the single image token to `image_tokens` copies."""
    image_text = tokenizer.id_to_token(image_token_id)
    if image_text and image_text != IMAGE_PLACEHOLDER:
        prompt = prompt.replace(IMAGE_PLACEHOLDER, image_text)
    ids = np.asarray(tokenizer.encode(prompt, add_special_tokens=False).ids, dtype=np.int64)
    positions = np.flatnonzero(ids == image_token_id)
    if positions.size > 1:
        raise PromptError("one image per request: the prompt holds more than one image token")
    if positions.size == 0 or image_tokens == 1:
        return ids
    if image_tokens < 1:
        raise PromptError(f"the prompt holds {IMAGE_PLACEHOLDER} but the request has no image")
    at = int(positions[0])
    return np.concatenate([ids[:at], np.full(image_tokens, image_token_id, dtype=np.int64), ids[at + 1 :]])


def render_messages(messages: Any, template: ChatTemplate, has_image: bool, add_generation_prompt: bool = True) -> str:
    """Validate the request's messages, place the image, and render the prompt text."""
    placed = place_image(normalize_messages(messages), has_image)
    return template.render(placed, add_generation_prompt=add_generation_prompt)
