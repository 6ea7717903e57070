"""The Ollama API: what PhotoPrism's ollama engine, Open WebUI and the Immich captioning tools send.

`POST /api/generate` and `POST /api/chat` stream newline-delimited JSON by default (`stream`
defaults to true, as in Ollama), each line `{model, created_at, response | message, done}`,
the last with `done: true`, `done_reason` and the durations in nanoseconds; `stream: false`
gives that last object alone, holding the whole answer. `GET /api/tags`, `POST /api/show`,
`GET /api/version` and `GET /api/ps` describe the one model. Errors are `{"error": "..."}`.

Decisions, where Ollama's behaviour cannot be ours:
- `options` we do not use (num_ctx, num_thread, mirostat, ...) are ignored, as Ollama ignores
  the ones a model does not take; `keep_alive` is accepted and ignored (the model stays loaded);
  `num_predict` <= 0 (Ollama's "until done") means the server's max_new_tokens_limit, and a
  larger one is clamped to it.
- What would change the answer and cannot be honoured is refused: `raw: true`, a `template`,
  a non-empty `suffix`, `context`, `think` other than false, `tools`.
- A request with no prompt and no image is Ollama's "load the model": answered at once.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ... import __version__
from ...engine import GenerationResult, TextDelta
from ...fastvlm.exceptions import RequestError
from ...fastvlm.fastvlm_model import GenerationRequest
from ...fastvlm.request_meta import schema_response_format
from ...generation import FinishReason, ResponseFormat
from ...metrics import RequestTracker
from ...resources.settings import GenerationLimits, HttpSettings
from .common import Served, collected, engine_events, first_then_rest
from .errors import Unsupported, message_of, retry_headers, status_for
from .inputs import (
    ImageInput,
    Knobs,
    checked_messages,
    first_user_turn,
    generation_params,
    image_from,
    images_before_text,
    one_image,
    validated,
)

NDJSON = "application/x-ndjson"
# The Ollama API version whose shapes these are (clients read /api/version to tell features apart:
# `format` as a schema needs 0.5).
OLLAMA_API_VERSION = "0.12.0"
API = "ollama"  # the metrics' name of this API
_STRICT = ConfigDict(extra="ignore", strict=True)


class Options(BaseModel):
    model_config = _STRICT

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_predict: int | None = None
    stop: list[str] | str | None = None
    seed: int | None = None
    repeat_penalty: float | None = None


class _Common(BaseModel):
    model_config = _STRICT

    model: str = ""
    format: str | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)
    stream: bool = True
    keep_alive: str | int | float | None = None
    think: bool | str | None = None
    tools: list[Any] | None = None


class GenerateBody(_Common):
    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None
    suffix: str = ""
    raw: bool = False
    template: str | None = None
    context: list[int] | None = None
    id: str | None = None  # PhotoPrism's request id


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(default_factory=list)


# --------------------------------------------------------------------------- reading a request


def _refuse_unsupported(body: _Common) -> None:
    if body.think not in (None, False, "false", ""):
        raise Unsupported(f'"{body.model}" does not support thinking', param="think")
    if body.tools:
        raise Unsupported(f'"{body.model}" does not support tools', param="tools")


def _generate_messages(body: GenerateBody) -> list[dict[str, Any]]:
    if body.raw:
        raise Unsupported("raw prompts are not supported: the model's chat template is always applied", param="raw")
    if body.template:
        raise Unsupported("a template is not supported: the model's own chat template is used", param="template")
    if body.suffix:
        raise Unsupported("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.context:
        raise Unsupported("context (a previous answer's tokens) is not supported; use /api/chat", param="context")
    messages: list[dict[str, Any]] = [{"role": "system", "content": body.system}] if body.system else []
    return [*messages, {"role": "user", "content": body.prompt}]


def _format(value: str | dict[str, Any] | None, limits: GenerationLimits) -> ResponseFormat | None:
    if value is None or value == "":
        return None
    if value == "json":
        return ResponseFormat("json")
    if isinstance(value, dict):
        return schema_response_format(value, limits, "'format'")
    raise RequestError(f"'format' must be \"json\" or a JSON Schema object, got {json.dumps(value[:40])}")


def _knobs(options: Options, limits: GenerationLimits, response_format: ResponseFormat | None) -> Knobs:
    num_predict = options.num_predict
    if num_predict is not None:  # <= 0: Ollama's "until done"; more than allowed: as much as allowed
        num_predict = limits.max_new_tokens if num_predict <= 0 else min(num_predict, limits.max_new_tokens)
    stop = [options.stop] if isinstance(options.stop, str) else options.stop
    seed = None if options.seed is None or options.seed < 0 else options.seed  # -1: Ollama's "random"
    return Knobs(
        max_tokens=num_predict,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k or None,  # 0: Ollama's "no top-k"
        seed=seed,
        repetition_penalty=options.repeat_penalty,
        stop=stop,
        response_format=response_format,
        names=(
            ("max_tokens", "options.num_predict"),
            ("temperature", "options.temperature"),
            ("top_p", "options.top_p"),
            ("top_k", "options.top_k"),
            ("seed", "options.seed"),
            ("repetition_penalty", "options.repeat_penalty"),
            ("stop", "options.stop"),
        ),
    )


def _chat_messages(
    body: ChatBody, http: HttpSettings, limits: GenerationLimits
) -> tuple[list[dict[str, Any]], list[ImageInput]]:
    """Messages for the model room, and their images."""
    messages: list[dict[str, Any]] = []
    images: list[ImageInput] = []
    first_user = first_user_turn([message.role for message in body.messages])
    for index, message in enumerate(body.messages):
        if message.tool_calls:
            raise Unsupported(f'"{body.model}" does not support tools', param=f"messages[{index}].tool_calls")
        found = [
            image_from(image, f"messages[{index}].images[{number}]", limits, http)
            for number, image in enumerate(message.images or [])
        ]
        images += found
        messages.append(
            {"role": message.role, "content": images_before_text(message.content, len(found), index, first_user)}
        )
    return messages, images


@dataclass(frozen=True)
class Parsed:
    """An Ollama request, read: what to generate, or (no prompt, no image) a load request."""

    endpoint: str  # "generate" or "chat"
    model: str
    stream: bool
    request: GenerationRequest | None  # None: nothing to generate (Ollama's model load)
    image: ImageInput | None


def parse(endpoint: str, data: Any, limits: GenerationLimits, http: HttpSettings) -> Parsed:
    """`data`: the decoded JSON body of /api/generate or /api/chat. Cheap: no model work."""
    body: GenerateBody | ChatBody
    if endpoint == "generate":
        body = validated(GenerateBody, data)
        messages = _generate_messages(body)
        images = [image_from(image, f"images[{i}]", limits, http) for i, image in enumerate(body.images or [])]
        empty = not body.prompt and not images
    else:
        body = validated(ChatBody, data)
        messages, images = _chat_messages(body, http, limits)
        empty = not body.messages
    if not body.model:
        raise RequestError("model is required")
    _refuse_unsupported(body)
    image = one_image(images, "images")
    if empty:
        return Parsed(endpoint, body.model, body.stream, None, None)
    params = generation_params(_knobs(body.options, limits, _format(body.format, limits)), limits)
    request = GenerationRequest(checked_messages(messages, limits), None, params)
    return Parsed(endpoint, body.model, body.stream, request, image)


# --------------------------------------------------------------------------- replies


def rfc3339(seconds: float) -> str:
    """Ollama's timestamps: RFC 3339, UTC, to the microsecond."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def created_at() -> str:
    return rfc3339(time.time())


_DONE_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop", FinishReason.LENGTH: "length"}


class Reply:
    """One request's reply objects, in Ollama's shapes."""

    def __init__(self, parsed: Parsed, model: str, started_ns: int) -> None:
        self.chat = parsed.endpoint == "chat"
        self.model = model
        self.started_ns = started_ns
        self.text: list[str] = []

    def _object(self, text: str, done: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        body["done"] = done
        return body

    def delta(self, event: TextDelta) -> dict[str, Any]:
        self.text.append(event.text)
        return self._object(event.text, False)

    def final(self, result: GenerationResult | None, now_ns: int, whole: bool) -> dict[str, Any]:
        """The last object: the whole answer when not streamed (`whole`), else empty text."""
        if result is None:  # a load request: nothing generated
            body = self._object("", True)
            body["done_reason"] = "load"
            return body
        body = self._object(result.text if whole else "", True)
        ttft_ns = int(result.ttft_ms * 1e6)
        body |= {
            "done_reason": _DONE_REASONS[result.finish_reason],
            "total_duration": now_ns - self.started_ns,
            "load_duration": 0,  # the model is loaded before the server serves
            "prompt_eval_count": result.input_tokens,
            "prompt_eval_duration": ttft_ns,  # queue, image and prefill: until the first token
            "eval_count": result.generated_tokens,
            "eval_duration": max(0, int(result.generation_time_ms * 1e6) - ttft_ns),
        }
        return body


def line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"


def error_response(error: BaseException) -> Response:
    status = status_for(error, overloaded=503)  # Ollama's answer to a full queue
    return JSONResponse({"error": message_of(error, status)}, status.code, headers=retry_headers(status))


def error_line(error: BaseException) -> bytes:
    """An error after the stream began: Ollama's last line."""
    return line({"error": message_of(error, status_for(error, overloaded=503))})


# --------------------------------------------------------------------------- the model's description


def model_details(served: Served) -> dict[str, Any]:
    service = served.ready()
    described = service.manager.describe()
    return {
        "parent_model": "",
        "format": "onnx",
        "family": "fastvlm",
        "families": ["fastvlm"],
        "parameter_size": "",  # the graphs do not state it; the size in bytes is in `size`
        "quantization_level": described.precision.upper(),
    }


def model_entry(served: Served) -> dict[str, Any]:
    service = served.ready()
    info = service.manager.backend.info
    # A digest of what identifies the files served: their id, precision and size.
    digest = hashlib.sha256(f"{service.model_id}:{info.precision}:{info.model_bytes}".encode()).hexdigest()
    return {
        "name": service.model_id,
        "model": service.model_id,
        "modified_at": rfc3339(served.started),
        "size": info.model_bytes,
        "digest": digest,
        "details": model_details(served),
    }


def tags(served: Served) -> dict[str, Any]:
    return {"models": [model_entry(served)]}


def running(served: Served) -> dict[str, Any]:
    entry = model_entry(served)
    context = served.ready().manager.describe().context_length
    return {"models": [entry | {"expires_at": "9999-12-31T23:59:59Z", "size_vram": 0, "context_length": context}]}


def show(served: Served, data: Any) -> dict[str, Any]:
    """`POST /api/show` for `{"model": NAME}` (or Ollama's older `name`)."""
    name = data.get("model") or data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise RequestError("model is required")
    served.model_name(name)
    service = served.ready()
    described = service.manager.describe()
    return {
        "license": "",
        "modelfile": "",
        "parameters": "",
        "template": service.manager.spec.text.chat_template,
        "details": model_details(served),
        "model_info": {"general.architecture": "fastvlm", "fastvlm.context_length": described.context_length},
        "capabilities": ["completion", "vision"],
        "modified_at": rfc3339(served.started),
    }


def version() -> dict[str, Any]:
    return {"version": OLLAMA_API_VERSION, "lumen_vlm": __version__}


async def stream_lines(first: Any, rest: AsyncIterator[Any], reply: Reply, clock: Any) -> AsyncIterator[bytes]:
    """The NDJSON stream: one line per text delta, then the final object (or an error line)."""
    event = first
    try:
        while True:
            if isinstance(event, GenerationResult):
                yield line(reply.final(event, clock(), whole=False))
                return
            yield line(reply.delta(event))
            event = await rest.__anext__()
    except Exception as exc:  # the stream began with 200: the error is its last line, as Ollama's
        yield error_line(exc)


async def answer(
    request: Request, served: Served, parsed: Parsed, image: bytes | None, tracker: RequestTracker
) -> Response:
    """Generate (or answer a load request) and reply streamed or whole."""
    service = served.ready()
    model = served.model_name(parsed.model)
    clock = time.time_ns
    started = clock()
    reply = Reply(parsed, model, started)
    if parsed.request is None:
        body = reply.final(None, clock(), whole=True)
        return StreamingResponse(iter([line(body)]), media_type=NDJSON) if parsed.stream else JSONResponse(body)
    generation = GenerationRequest(parsed.request.messages, image, parsed.request.params)
    events = engine_events(service, generation, tracker)
    if not parsed.stream:
        result = await collected(events, request)
        return JSONResponse(reply.final(result, clock(), whole=True))
    first, rest = await first_then_rest(events)
    return StreamingResponse(stream_lines(first, rest, reply, clock), media_type=NDJSON)
