"""Chat messages -> prompt text -> token ids, through the model's own chat template.

The template is rendered in jinja2's immutable sandbox (it comes from a downloaded file, so
it is treated as untrusted code). The one image of a request is marked by the ``<image>``
placeholder; when no message carries it, it leads the first user turn, as Apple's reference
``predict.py`` does, so a plain question about a photo is still answered about the photo.

Templates read a message's content in one of two shapes, and each request is rendered in the
shape the model's template reads (`ContentForm`), decided once when the template is loaded
by rendering a probe message both ways:

* **string** (Apple's and the onnx-community exports' ChatML, ``message['content']``): list
  content is joined into one string, an image part becoming ``<image>`` where it stands; an
  unplaced image is written ``<image>\\n`` before the first user turn's text. A template that
  reads both shapes is given strings.
* **typed parts** (transformers' FastVLM conversion, which iterates
  ``message['content'] | selectattr('type', 'equalto', 'text')`` and renders nothing of a
  plain string): string content ``s`` is passed as ``[{"type": "text", "text": s}]``, list
  content as the client sent it, and an unplaced image as ``{"type": "image"}`` at the start of
  the first user turn's parts; the template lays the parts out itself. Where the template
  renders an image part as something other than ``<image>``, images are passed to it as the
  text part ``<image>`` instead.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from ..resources.exceptions import ModelFilesError
from ..resources.model_spec import IMAGE_PLACEHOLDER
from ..text import invalid_text, shown
from .exceptions import PromptError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

Part = dict[str, str]  # {"type": "text", "text": ...} or {"type": "image"}
Message = dict[str, Any]  # {"role": ..., "content": str | list[Part]}

IMAGE_PART: Part = {"type": "image"}


def _text_part(text: str) -> Part:
    return {"type": "text", "text": text}


# --------------------------------------------------------------------------- messages


def _text(value: str, where: str) -> str:
    """`value`, refused when it is not valid text (the tokenizer cannot encode a lone surrogate)."""
    problem = invalid_text(value)
    if problem is not None:
        raise PromptError(f"{where} is not valid text: {problem}")
    return value


def _part(part: Any, where: str) -> Part:
    """One content part of the OpenAI-like list form, validated and copied."""
    if not isinstance(part, Mapping):
        raise PromptError(f"{where} must be an object with a 'type', got {_kind(part)}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise PromptError(f"{where} of type 'text' needs a string 'text'")
        return _text_part(_text(text, f"{where}.text"))
    if kind == "image":
        return dict(IMAGE_PART)
    got = shown(kind) if isinstance(kind, str) else _kind(kind)
    raise PromptError(f"{where} has type {got}; expected 'text' or 'image'")


def _kind(value: Any) -> str:
    """What a JSON value is, for a message that must not echo the value itself."""
    return "nothing" if value is None else f"a JSON {type(value).__name__}"


def normalize_messages(messages: Any) -> list[Message]:
    """Validate messages; raises PromptError. Content stays a string or a list of parts
    (validated copies), so the template can be given the shape it reads.

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
            content = [_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]
        elif isinstance(content, str):
            content = _text(content, f"{where}.content")
        else:
            raise PromptError(f"{where}.content must be a string or a list of text/image parts, got {_kind(content)}")
        normalized.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in normalized):
        raise PromptError("messages need at least one message with role 'user'")
    return normalized


def _joined(content: str | list[Part]) -> str:
    """Content as one string: text parts joined, an image part as the placeholder where it stands."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] if part["type"] == "text" else IMAGE_PLACEHOLDER for part in content)


def _parts(content: str | list[Part]) -> list[Part]:
    """Content as typed parts: a string is one text part (the OpenAI convention)."""
    return [_text_part(content)] if isinstance(content, str) else [dict(part) for part in content]


def _image_count(content: str | list[Part]) -> int:
    if isinstance(content, str):
        return content.count(IMAGE_PLACEHOLDER)
    return sum(1 if part["type"] == "image" else part["text"].count(IMAGE_PLACEHOLDER) for part in content)


def place_image(messages: list[Message], has_image: bool) -> list[Message]:
    """Make sure the image appears exactly once when there is an image, never otherwise.

    An unplaced image leads the first user turn: as ``<image>\\n`` before string content
    (Apple's predict.py), as an image part before list content (its template lays it out).
    """
    count = sum(_image_count(m["content"]) for m in messages)
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
    content = first_user["content"]
    if isinstance(content, str):
        first_user["content"] = IMAGE_PLACEHOLDER + "\n" + content
    else:
        first_user["content"] = [dict(IMAGE_PART), *content]
    return placed


# --------------------------------------------------------------------------- template


class ContentForm(enum.Enum):
    """The shape of message content a chat template reads."""

    STRING = "string"  # message['content'] as a string
    PARTS = "parts"  # a list of {"type": "text" | "image", ...} parts


# A word no template adds of its own, so finding it in a probe's output means the template
# rendered the message's text.
_PROBE_TEXT = "lumenprobe7f3a"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# How much of a template's own error message a PromptError carries: a template can raise
# with client text in it (``raise_exception(message['content'])``).
TEMPLATE_ERROR_CHARS = 200


class ChatTemplate:
    """A model's chat template, compiled once in a sandbox with transformers' conventions.

    `content_form` is the content shape the template renders the user's text from;
    `image_part_renders_placeholder` whether, given typed parts, it writes an image part as
    ``<image>``. A template that does not compile, or shows the user's text in neither shape,
    is a ModelFilesError.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ModelFilesError(f"the model's chat template is not valid Jinja: {exc} (line {exc.lineno})") from exc
        self._special_tokens = dict(special_tokens or {})
        content_form, self.image_part_renders_placeholder = self._probe()
        if content_form is None:
            raise ModelFilesError(
                "the model's chat template renders the user's text from neither string content "
                "nor typed text parts ({'type': 'text', 'text': ...}); every request would lose it"
            )
        self.content_form: ContentForm = content_form

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """Render messages as they are (see `render_messages` for a request's messages)."""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._special_tokens
            )
        except jinja2.exceptions.SecurityError as exc:
            raise PromptError(f"the chat template tried an unsafe operation: {exc}") from exc
        except jinja2.exceptions.TemplateError as exc:
            # Templates reject conversations they cannot express (e.g. roles not alternating).
            reason = shown(str(exc), TEMPLATE_ERROR_CHARS)
            raise PromptError(f"the model's chat template rejected the messages: {reason}") from exc
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:  # its own bugs
            reason = shown(f"{type(exc).__name__}: {exc}", TEMPLATE_ERROR_CHARS)
            raise PromptError(f"the model's chat template failed on the messages: {reason}") from exc

    def shaped(self, messages: list[Message]) -> list[Message]:
        """Normalized messages with their content in the shape this template reads."""
        if self.content_form is ContentForm.PARTS:
            return [{"role": m["role"], "content": _parts(m["content"])} for m in messages]
        return [{"role": m["role"], "content": _joined(m["content"])} for m in messages]

    def for_template(self, messages: list[Message]) -> list[Message]:
        """Placed messages as handed to the template: image parts it would not write as the
        placeholder become the placeholder's text."""
        if self.content_form is not ContentForm.PARTS or self.image_part_renders_placeholder:
            return messages
        return [
            {
                "role": m["role"],
                "content": [_text_part(IMAGE_PLACEHOLDER) if p["type"] == "image" else p for p in m["content"]],
            }
            for m in messages
        ]

    def _probe(self) -> tuple[ContentForm | None, bool]:
        """Render a user message with string content, then with a text part, and see which
        shows its text; then whether an image part adds a placeholder."""
        if _PROBE_TEXT in self._probe_render(_PROBE_TEXT):
            return ContentForm.STRING, True
        text_only = self._probe_render([_text_part(_PROBE_TEXT)])
        if _PROBE_TEXT not in text_only:
            return None, False
        without = text_only.count(IMAGE_PLACEHOLDER)
        with_image = self._probe_render([dict(IMAGE_PART), _text_part(_PROBE_TEXT)]).count(IMAGE_PLACEHOLDER)
        return ContentForm.PARTS, with_image > without

    def _probe_render(self, content: str | list[Part]) -> str:
        """The probe message rendered; "" when the template fails on it in any way (then that
        shape is not the one it reads, and a request in it would fail the same way)."""
        try:
            return self.render([{"role": "user", "content": content}])
        except Exception:  # untrusted template code: a probe never fails the load by itself
            return ""


# --------------------------------------------------------------------------- tokens


def ensure_image_token(tokenizer: Tokenizer, image_token_id: int, path: Path) -> None:
    """Make `image_token_id` (the config's image_token_index) a token, or raise ModelFilesError.

    A token of another spelling at that id is used as it is (encode_prompt writes the
    placeholder as it). A tokenizer that lacks both the id and ``<image>`` gets ``<image>``
    added as a special token, as transformers' FastVLM conversion adds it; the tokenizer can
    only add it at its next free id, so the config must name that id.
    """
    if tokenizer.id_to_token(image_token_id) is not None:
        return
    existing = tokenizer.token_to_id(IMAGE_PLACEHOLDER)
    if existing is not None:
        raise ModelFilesError(
            f"{path} has {IMAGE_PLACEHOLDER} at id {existing}, but the config's image_token_index "
            f"{image_token_id} is no token in it: the two files disagree"
        )
    tokenizer.add_special_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)])
    added = tokenizer.token_to_id(IMAGE_PLACEHOLDER)
    if added != image_token_id:
        raise ModelFilesError(
            f"{path} has no {IMAGE_PLACEHOLDER} token and no token {image_token_id} (the config's "
            f"image_token_index); {IMAGE_PLACEHOLDER} can be added only at the tokenizer's next id, {added}"
        )
    log.info("%s lacks %s: added it at id %d, the config's image_token_index", path.name, IMAGE_PLACEHOLDER, added)


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
    """Validate the request's messages, shape them as the template reads them, place the
    image, and render the prompt text."""
    placed = place_image(template.shaped(normalize_messages(messages)), has_image)
    return template.render(template.for_template(placed), add_generation_prompt=add_generation_prompt)
