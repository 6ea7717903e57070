"""What the HTTP APIs share on the way in: JSON bodies read into typed models, images from
base64, data: URLs or allowed hosts, and the generation parameters with the gRPC front door's
bounds and rules (`request_meta`'s, called here, never restated).

Each API module (`ollama`, `openai_api`) reads its own fields and hands the values here, named as
that API names them, so every message speaks the client's language.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from ...fastvlm.exceptions import ImageError, RequestError
from ...fastvlm.fastvlm_model import GenerationParams
from ...fastvlm.image import image_limits
from ...fastvlm.prompt import IMAGE_PLACEHOLDER, Message, normalize_messages
from ...fastvlm.request_meta import (
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    check_image_payload,
    check_stop_sequences,
    sampling_params,
)
from ...generation import ResponseFormat
from ...resources.settings import GenerationLimits, HttpSettings
from ...text import shown

Model = TypeVar("Model", bound=BaseModel)

_SHOWN_ERRORS = 3  # pydantic's problems named in one message; the rest counted


def decode_body(body: bytes) -> Any:
    """The request's JSON; a RequestError saying where it broke."""
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON ({exc.msg} at position {exc.pos})") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None


def validated(model: type[Model], data: Any) -> Model:
    """`data` as `model`, or a RequestError naming each field at fault as the client spelt it."""
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_field(error['loc'])}: {error['msg']}" for error in exc.errors()[:_SHOWN_ERRORS]]
        more = exc.error_count() - len(problems)
        raise RequestError("; ".join(problems) + (f" (and {more} more)" if more > 0 else "")) from None


def _field(loc: Sequence[Any]) -> str:
    """pydantic's location as a field path: messages[0].content; union members' names left out."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not (part[:1].isupper() or "[" in part or part in {"str", "list", "dict", "function-after"}):
            path += f".{part}" if path else part
    return f"'{path}'" if path else "the request"


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageURL:
    """An http(s) image URL on an allowed host, to be fetched (`fetch_image`)."""

    url: str
    where: str


ImageInput = bytes | ImageURL  # an image as a request carries it, before any fetch


def image_from(value: str, where: str, limits: GenerationLimits, http: HttpSettings) -> ImageInput:
    """An image as the APIs send it: raw base64, a ``data:`` URL, or an http(s) URL on a host of
    `http.allowed_image_hosts` (anything else is refused: the server fetches nothing a client
    names). `where` names the field in messages."""
    if value.startswith("data:"):
        return _data_url(value, where, limits)
    scheme = value.split(":", 1)[0].lower() if ":" in value[:8] else ""
    if scheme in {"http", "https"}:
        host = (urlsplit(value).hostname or "").lower()
        if host not in http.allowed_image_hosts:
            raise RequestError(
                f"{where}: image URLs are fetched only from the hosts in server.http.allowed_image_hosts, "
                f"and {shown(host)} is not one; send the image as base64 or a data: URL"
            )
        return ImageURL(value, where)
    if scheme and not _could_be_base64(value[:8]):
        raise RequestError(f"{where}: {shown(scheme)} URLs are not supported; send base64 or a data: URL")
    return _base64(value, where, limits)


def _could_be_base64(text: str) -> bool:
    return all(ch.isalnum() or ch in "+/=" for ch in text)


def _data_url(value: str, where: str, limits: GenerationLimits) -> bytes:
    header, comma, data = value.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RequestError(f"{where}: a data: URL must be base64, as data:image/jpeg;base64,...")
    declared = header[len("data:") : -len(";base64")]
    image = _base64(data, where, limits)
    check_image_payload(image, declared, image_limits(limits))  # the declared type must match the bytes
    return image


def _base64(text: str, where: str, limits: GenerationLimits) -> bytes:
    if 3 * (len(text) // 4) > limits.max_payload_bytes + 3:  # refused before decoding
        raise ImageError(
            f"{where}: the image is about {3 * (len(text) // 4)} bytes, more than the limit of "
            f"{limits.max_payload_bytes} bytes (max_payload_bytes)"
        )
    if "\n" in text or "\r" in text:  # line-wrapped base64 (MIME's), as Go's decoder takes it
        text = text.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the image is not valid base64 (nor a data: URL)") from None


async def fetch_image(image: ImageURL, limits: GenerationLimits, http: HttpSettings) -> bytes:
    """An allowed image URL's bytes, at most max_payload_bytes, within image_fetch_timeout_s.

    Redirects are not followed: one could lead to a host outside the allow-list."""
    received = bytearray()
    try:
        async with (
            httpx.AsyncClient(timeout=http.image_fetch_timeout_s, follow_redirects=False) as client,
            client.stream("GET", image.url) as response,
        ):
            if response.status_code != 200:
                raise RequestError(f"{image.where}: fetching the image URL answered HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > limits.max_payload_bytes:
                    raise ImageError(
                        f"{image.where}: the image URL holds more than the limit of "
                        f"{limits.max_payload_bytes} bytes (max_payload_bytes)"
                    )
    except httpx.HTTPError as exc:
        raise RequestError(f"{image.where}: the image URL could not be fetched ({type(exc).__name__})") from None
    return bytes(received)


def checked_image(image: bytes, limits: GenerationLimits) -> bytes:
    """Size and signature, as the gRPC front door checks them."""
    checked = check_image_payload(image, "", image_limits(limits))
    if checked is None:
        raise ImageError("the image is empty")
    return checked


def one_image(images: list[ImageInput], where: str) -> ImageInput | None:
    if len(images) > 1:
        raise RequestError(f"{where}: one image per request, got {len(images)} (FastVLM takes one photo at a time)")
    return images[0] if images else None


# --------------------------------------------------------------------------- messages and parameters


def first_user_turn(roles: Sequence[Any]) -> int | None:
    """The index of the first user message, whose image the model room places (as for gRPC)."""
    return next((index for index, role in enumerate(roles) if role == "user"), None)


def images_before_text(text: str, image_count: int, index: int, first_user: int | None) -> str:
    """A later message's text with its images marked before it, where FastVLM was trained to
    see them, whatever the order the client sent the parts in (PhotoPrism sends text first)."""
    if index == first_user:
        return text
    return f"{IMAGE_PLACEHOLDER}\n" * image_count + text


def checked_messages(messages: list[dict[str, Any]], limits: GenerationLimits) -> list[Message]:
    """Messages as the model room takes them, their text bounded by max_messages_chars."""
    chars = sum(_text_chars(message.get("content")) for message in messages)
    if chars > limits.max_messages_chars:
        raise RequestError(
            f"the messages hold {chars} characters of text, more than the limit of {limits.max_messages_chars}"
        )
    return normalize_messages(messages)


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    return 0


@dataclass(frozen=True)
class Knobs:
    """The generation fields of a request, as one API sent them (None: not sent), and the
    names that API gives them, for messages."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] | None = None
    response_format: ResponseFormat | None = None
    names: tuple[tuple[str, str], ...] = ()  # (our name, the API's name)

    def name(self, field: str) -> str:
        return f"'{dict(self.names).get(field, field)}'"


def generation_params(knobs: Knobs, limits: GenerationLimits) -> GenerationParams:
    """GenerationParams under the gRPC front door's bounds; unset fields get the server's defaults
    (greedy decoding, `default_max_new_tokens`) whichever API asked."""
    _in_range(knobs, "temperature", 0.0, MAX_TEMPERATURE)
    _in_range(knobs, "top_p", 0.0, 1.0, low_open=True)
    _in_range(knobs, "top_k", 0, 2**31 - 1)
    _in_range(knobs, "seed", 0, MAX_SEED)
    _in_range(knobs, "repetition_penalty", 0.0, MAX_REPETITION_PENALTY, low_open=True)
    _in_range(knobs, "max_tokens", 1, limits.max_new_tokens)
    temperature = 0.0 if knobs.temperature is None else float(knobs.temperature)
    stop = check_stop_sequences(knobs.stop or [], knobs.name("stop"), limits)
    return GenerationParams(
        max_new_tokens=limits.request_default_max_new_tokens if knobs.max_tokens is None else knobs.max_tokens,
        sampling=sampling_params(temperature, knobs.top_p, knobs.top_k, knobs.repetition_penalty, knobs.seed),
        stop_sequences=stop,
        response_format=knobs.response_format,
    )


def _in_range(knobs: Knobs, field: str, low: float, high: float, *, low_open: bool = False) -> None:
    value = getattr(knobs, field)
    if value is None:
        return
    below = value <= low if low_open else value < low
    if below or value > high or value != value:  # value != value: NaN
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{knobs.name(field)} must be in {interval}, got {value!r}")
