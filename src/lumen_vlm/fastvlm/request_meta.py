"""From a complete request to a `GenerationRequest`: the correlation_id, payload checks, meta values.

Everything here is cheap and runs before a request is admitted, so a malformed request is
refused at once, with a message naming the key and what is wrong with it, and never takes a
generation slot. Every refusal is an `InputError` (INVALID_ARGUMENT on the wire): a
`RequestError` for meta values, and the owners' own errors for the checks they own and this
module only calls: `image.check_image_bytes` (size, signature) and `prompt.normalize_messages`
(roles, content). Echoed client values go through `text.shown`. A chunked payload is whole
before it gets here: `chunks` reassembles it into the `CompleteRequest` read here.

Meta values are strings on the wire. Numbers must be plain ASCII decimal, as every client
formats them (the Go SDK sends ``"%d"`` integers and ``"%.1f"`` floats, so an integer may also
be written ``"256.0"``): no spaces, underscores, other scripts' digits, hex, inf or nan, which
Python's int() and float() would take. Bools are true/false/1/0/yes/no in any case. Unknown
keys are ignored (clients add their own), and logged at DEBUG.

A correlation_id is at most `MAX_CORRELATION_ID_BYTES`: every response and log line about a
request carries it, so an unbounded one would cost its size again in each.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from collections.abc import Mapping
from typing import Any

from ..generation import ResponseFormat, SamplingParams
from ..resources.model_spec import ResizeMode
from ..resources.settings import GenerationLimits
from ..text import invalid_text, shown, shown_id, shown_list
from .chunks import CompleteRequest
from .exceptions import RequestError
from .fastvlm_model import GenerationParams, GenerationRequest
from .image import IMAGE_MIMES, ImageLimits, check_image_bytes, image_limits
from .prompt import Message, normalize_messages

log = logging.getLogger(__name__)

# Common spellings of the accepted types; "image/jpg" is not registered but widely sent.
MIME_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}

# Bounds with no setting of their own. OpenAI-style APIs cap temperature at 2: above it the
# distribution is close to uniform and the output is noise, so a larger value is a client bug.
MAX_TEMPERATURE = 2.0
# transformers suggests 1.0-1.5; 10 already makes every seen token practically impossible.
MAX_REPETITION_PENALTY = 10.0
MAX_SEED = 2**63 - 1
# Bits of a seed drawn for an unseeded sampled request: 53 keep it exact in any JSON reader
# (JavaScript numbers are doubles), so the reported seed can always be sent back.
DRAWN_SEED_BITS = 53
# A UUID is 36 bytes, a W3C trace id 32 and a traceparent 55: 256 leaves room for any id
# scheme (a client prefix, a trace id and a span) while keeping every line that names it short.
MAX_CORRELATION_ID_BYTES = 256

KNOWN_META_KEYS = frozenset(
    {
        "messages",
        "prompt",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "seed",
        "stop_sequences",
        "stop",
        "add_generation_prompt",
        "do_sample",
        "resize_mode",
        "response_format",
    }
)
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})

# --------------------------------------------------------------------------- the request's id


def check_correlation_id(correlation_id: str) -> None:
    """Refuse a correlation_id longer than `MAX_CORRELATION_ID_BYTES` in UTF-8 (an empty one is fine)."""
    size = len(correlation_id.encode("utf-8", "surrogatepass"))  # counts whatever the wire decoded to
    if size > MAX_CORRELATION_ID_BYTES:
        raise RequestError(
            f"correlation_id is {size} bytes, more than the limit of {MAX_CORRELATION_ID_BYTES} bytes (UTF-8)"
        )


# --------------------------------------------------------------------------- scalar values

# What a number may look like, in place of int() and float(), which also take spaces, "1_0",
# other scripts' digits ("١٠"), inf and nan. [0-9], never \d, which matches those digits too.
# A decimal is a JSON number; an integer is one without exponent or fraction, but "256.0" (an
# integral "%.1f", the Go SDK's float format) is one too.
_INTEGER = re.compile(r"-?[0-9]+(?:\.0+)?")
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def parse_int(key: str, raw: str, low: int, high: int) -> int:
    """An integer in [low, high], in ASCII digits with an optional "-"; "256" and "256.0" both give 256."""
    if not _INTEGER.fullmatch(raw):
        raise RequestError(f"meta '{key}' must be an integer in ASCII digits, such as 256 or 256.0, got {shown(raw)}")
    out_of_range = RequestError(f"meta '{key}' must be between {low} and {high}, got {shown(raw)}")
    try:
        value = int(raw.split(".", 1)[0])
    except ValueError:  # more digits than int() converts (4,300): far outside any bound
        raise out_of_range from None
    if not low <= value <= high:
        raise out_of_range
    return value


def parse_float(key: str, raw: str, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite float in [low, high] (or (low, high] when low_open), in ASCII decimal notation."""
    if not _DECIMAL.fullmatch(raw):
        raise RequestError(
            f"meta '{key}' must be a number in ASCII decimal notation, such as 0.7 or 1e-3, got {shown(raw)}"
        )
    value = float(raw)
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"meta '{key}' must be a number in {interval}, got {shown(raw)}")
    return value


def parse_bool(key: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(f"meta '{key}' must be true/false (or 1/0, yes/no), got {shown(raw)}")


# --------------------------------------------------------------------------- meta keys


def parse_messages(meta: Mapping[str, str], limits: GenerationLimits) -> list[Message]:
    """`messages` (a JSON list of {role, content}) or, without it, `prompt` as one user turn.

    The JSON is decoded here; the messages are validated and normalized by
    `prompt.normalize_messages`, which owns them (its PromptError names the message at fault).
    """
    raw = meta.get("messages", "")
    if not raw.strip():
        return normalize_messages([{"role": "user", "content": _parse_prompt(meta, limits)}])
    if len(raw) > limits.max_messages_chars:
        raise RequestError(
            f"meta 'messages' is {len(raw)} characters, more than the limit of {limits.max_messages_chars}"
        )
    return normalize_messages(_decode_json("messages", raw, "a JSON list of {role, content} objects"))


def _decode_json(key: str, raw: str, expected: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"meta '{key}' is not valid JSON ({exc.msg} at position {exc.pos}); expected {expected}"
        ) from None
    except RecursionError:  # e.g. "[[[[...": the decoder recurses once per level
        raise RequestError(f"meta '{key}' is nested too deeply to be {expected}") from None


def _parse_prompt(meta: Mapping[str, str], limits: GenerationLimits) -> str:
    prompt = meta.get("prompt")
    if prompt is None:
        raise RequestError("meta needs 'messages' (a JSON list of {role, content} objects) or 'prompt'")
    if not prompt.strip():
        raise RequestError("meta 'prompt' is empty")
    if len(prompt) > limits.max_messages_chars:
        raise RequestError(
            f"meta 'prompt' is {len(prompt)} characters, more than the limit of {limits.max_messages_chars}"
        )
    return prompt


def parse_stop_sequences(meta: Mapping[str, str], limits: GenerationLimits) -> tuple[str, ...]:
    """`stop_sequences` (or its alias `stop`): a JSON list of non-empty strings, bounded."""
    key, raw = _stop_key(meta)
    if raw is None or not raw.strip():
        return ()
    value = _decode_json(key, raw, "a JSON list of strings")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RequestError(f"meta '{key}' must be a JSON list of strings, got {shown(raw)}")
    return check_stop_sequences(value, f"meta '{key}'", limits)


def check_stop_sequences(value: list[str], where: str, limits: GenerationLimits) -> tuple[str, ...]:
    """Stop sequences as every front door bounds them: `where` names the field in messages."""
    if len(value) > limits.max_stop_sequences:
        raise RequestError(
            f"{where} holds {len(value)} stop sequences, more than the limit of {limits.max_stop_sequences}"
        )
    for index, stop in enumerate(value):
        if not stop:
            raise RequestError(f"{where}[{index}] is an empty string")
        problem = invalid_text(stop)
        if problem is not None:
            raise RequestError(f"{where}[{index}] is not valid text: {problem}")
        if len(stop) > limits.max_stop_sequence_chars:
            raise RequestError(
                f"{where}[{index}] is {len(stop)} characters, more than the limit of {limits.max_stop_sequence_chars}"
            )
    return tuple(value)


def _stop_key(meta: Mapping[str, str]) -> tuple[str, str | None]:
    stop_sequences, stop = meta.get("stop_sequences"), meta.get("stop")
    if stop_sequences is not None and stop is not None and stop_sequences != stop:
        raise RequestError("meta 'stop_sequences' and its alias 'stop' are both set and differ; send one")
    return ("stop_sequences", stop_sequences) if stop_sequences is not None else ("stop", stop)


def parse_sampling(meta: Mapping[str, str]) -> SamplingParams:
    """Sampling happens when temperature > 0.

    `do_sample=true` without a temperature means temperature 1.0 (transformers' default).
    `do_sample=false` does not override an explicit temperature: the Go SDK always sends
    do_sample=false next to the temperature the app asked for.

    A sampled request without a seed gets a fresh random one, which the result reports, so any
    sampled answer can be reproduced by sending its seed back. A greedy request keeps the seed
    it was given, if any (greedy decoding does not use it).
    """
    temperature = _optional(meta, "temperature", lambda k, v: parse_float(k, v, 0.0, MAX_TEMPERATURE))
    do_sample = _optional(meta, "do_sample", parse_bool)
    if temperature is None:  # do_sample alone: transformers' default temperature; neither: greedy
        temperature = 1.0 if do_sample else SamplingParams.temperature
    top_p = _optional(meta, "top_p", lambda k, v: parse_float(k, v, 0.0, 1.0, low_open=True))
    top_k = _optional(meta, "top_k", lambda k, v: parse_int(k, v, 0, 2**31 - 1))
    penalty = _optional(
        meta, "repetition_penalty", lambda k, v: parse_float(k, v, 0.0, MAX_REPETITION_PENALTY, low_open=True)
    )
    seed = _optional(meta, "seed", lambda k, v: parse_int(k, v, 0, MAX_SEED))
    return sampling_params(temperature, top_p, top_k, penalty, seed)


def sampling_params(
    temperature: float, top_p: float | None, top_k: int | None, penalty: float | None, seed: int | None
) -> SamplingParams:
    """The sampling rules every front door shares, on values already checked against the bounds
    above; None: SamplingParams' default. A sampled request without a seed gets one drawn."""
    if seed is None and temperature > 0:
        seed = secrets.randbits(DRAWN_SEED_BITS)
    try:
        given = {"top_k": top_k, "top_p": top_p, "repetition_penalty": penalty}  # unset: SamplingParams' defaults
        return SamplingParams(
            temperature=temperature, seed=seed, **{key: value for key, value in given.items() if value is not None}
        )
    except ValueError as exc:  # the bounds above are stricter; kept as a second line of defence
        raise RequestError(f"invalid sampling parameters: {exc}") from None


def _optional(meta: Mapping[str, str], key: str, parse: Any) -> Any:
    raw = meta.get(key)
    return None if raw is None or not raw.strip() else parse(key, raw)


RESPONSE_FORMAT_FORMS = '"json", {"type": "json_schema", "schema": {...}} or {"type": "regex", "pattern": "..."}'
# The JSON forms' keys besides "type", by type.
_RESPONSE_FORMAT_KEYS = {"json_schema": "schema", "regex": "pattern"}


def parse_response_format(meta: Mapping[str, str], limits: GenerationLimits) -> ResponseFormat | None:
    """`response_format`: ``json`` (any JSON object), or the JSON text of
    ``{"type": "json_schema", "schema": {...}}`` or ``{"type": "regex", "pattern": "..."}``.

    Only the form is checked here; whether the schema or pattern compiles is the engine's to
    say, at submission. A schema is kept as compact JSON text in its own key order (the order
    the answer's keys take), so the same schema sent with other spacing compiles once.
    """
    raw = meta.get("response_format")
    if raw is None or not raw.strip():
        return None
    if raw.strip().lower() == "json":
        return ResponseFormat("json")
    if len(raw) > limits.max_response_format_chars:
        raise RequestError(
            f"meta 'response_format' is {len(raw)} characters, "
            f"more than the limit of {limits.max_response_format_chars}"
        )
    value = _decode_json("response_format", raw, RESPONSE_FORMAT_FORMS)
    kind = value.get("type") if isinstance(value, dict) else None
    field_name = _RESPONSE_FORMAT_KEYS.get(kind) if isinstance(kind, str) else None
    if field_name is None or set(value) != {"type", field_name}:
        raise RequestError(f"meta 'response_format' must be {RESPONSE_FORMAT_FORMS}, got {shown(raw)}")
    source = value[field_name]
    if kind == "json_schema":
        return schema_response_format(source, limits, "meta 'response_format' schema")
    if not isinstance(source, str) or not source:
        raise RequestError("meta 'response_format' pattern must be a non-empty string (a regular expression)")
    return _checked_format("regex", source, "meta 'response_format' pattern")


def schema_response_format(schema: Any, limits: GenerationLimits, where: str) -> ResponseFormat:
    """A JSON Schema (a decoded JSON object) as a response format, for every front door: kept as
    compact JSON text in its own key order (the order the answer's keys take), so the same
    schema sent with other spacing compiles once."""
    if not isinstance(schema, dict):
        raise RequestError(f"{where} must be a JSON object (a JSON Schema)")
    source = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    if len(source) > limits.max_response_format_chars:
        raise RequestError(
            f"{where} is {len(source)} characters, more than the limit of {limits.max_response_format_chars}"
        )
    return _checked_format("json_schema", source, where)


def _checked_format(kind: str, source: str, where: str) -> ResponseFormat:
    problem = invalid_text(source)
    if problem is not None:
        raise RequestError(f"{where} is not valid text: {problem}")
    return ResponseFormat(kind, source)


def parse_generation_params(meta: Mapping[str, str], limits: GenerationLimits) -> GenerationParams:
    default_max = limits.request_default_max_new_tokens
    max_new = _optional(meta, "max_new_tokens", lambda k, v: parse_int(k, v, 1, limits.max_new_tokens))
    add_prompt = _optional(meta, "add_generation_prompt", parse_bool)
    return GenerationParams(
        max_new_tokens=default_max if max_new is None else max_new,
        sampling=parse_sampling(meta),
        stop_sequences=parse_stop_sequences(meta, limits),
        add_generation_prompt=GenerationParams.add_generation_prompt if add_prompt is None else add_prompt,
        response_format=parse_response_format(meta, limits),
    )


def parse_resize_mode(meta: Mapping[str, str]) -> ResizeMode | None:
    raw = meta.get("resize_mode")
    if raw is None or not raw.strip():
        return None
    try:
        return ResizeMode(raw.strip().lower())
    except ValueError:
        choices = ", ".join(mode.value for mode in ResizeMode)
        raise RequestError(f"meta 'resize_mode' must be one of {choices}, got {shown(raw)}") from None


# --------------------------------------------------------------------------- payload


def normalize_mime(mime: str) -> str:
    """Lower-cased, parameters dropped, aliases resolved: " Image/JPG; q=1" -> "image/jpeg"."""
    base = mime.split(";", 1)[0].strip().lower()
    return MIME_ALIASES.get(base, base)


def check_image_payload(payload: bytes, payload_mime: str, limits: ImageLimits) -> bytes | None:
    """The image bytes to decode, or None for a text-only request.

    The declared type must be an accepted one; size and signature (which must agree with the
    declared type) are checked by `image.check_image_bytes`. Decoding (corrupt, truncated, too
    many pixels) is the model manager's job.
    """
    declared = normalize_mime(payload_mime)
    if not payload:
        if declared:
            raise RequestError(f"payload_mime is {shown(payload_mime)} but the payload is empty")
        return None
    if declared and declared not in IMAGE_MIMES:
        raise RequestError(f"payload_mime {shown(payload_mime)} is not supported; accepted: {', '.join(IMAGE_MIMES)}")
    check_image_bytes(payload, limits, declared)
    return payload


# --------------------------------------------------------------------------- the whole request


def build_generation_request(request: CompleteRequest, limits: GenerationLimits) -> GenerationRequest:
    """Validate a request's payload and meta into the model manager's request. Raises InputError."""
    unknown = sorted(set(request.meta) - KNOWN_META_KEYS)
    if unknown:
        log.debug(
            "correlation_id=%s ignores unknown meta keys: %s", shown_id(request.correlation_id), shown_list(unknown)
        )
    image = check_image_payload(request.payload, request.payload_mime, image_limits(limits))
    return GenerationRequest(
        messages=parse_messages(request.meta, limits),
        image=image,
        params=parse_generation_params(request.meta, limits),
        resize_mode=parse_resize_mode(request.meta),
    )
