"""The OpenAI API: `POST /v1/chat/completions`, `POST /v1/responses` (PhotoPrism's openai engine)
and `GET /v1/models`.

Chat completions stream as Server-Sent Events: every chunk has the same `id`, the first delta
carries the role, the last chunk the `finish_reason`; with `stream_options.include_usage` a
last chunk with `choices: []` and `usage`; then `data: [DONE]`. The Responses API streams its
typed events (`response.created` ... `response.output_text.delta` ... `response.completed`).
Errors are `{"error": {"message", "type", "param", "code"}}`.

What would change the answer and cannot be honoured is refused with 400 rather than ignored:
`n` > 1, tools, logprobs, non-zero presence/frequency penalties, logit_bias. Fields that do not
change it (user, metadata, store, service_tier, reasoning, detail) are accepted and ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ...engine import GenerationResult
from ...fastvlm.exceptions import RequestError
from ...fastvlm.fastvlm_model import GenerationRequest
from ...fastvlm.request_meta import schema_response_format
from ...generation import FinishReason, ResponseFormat
from ...metrics import RequestTracker
from ...resources.settings import GenerationLimits, HttpSettings
from .common import Served, collected, engine_events, first_then_rest
from .errors import HttpError, Unsupported, message_of, retry_headers, status_for
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

SSE = "text/event-stream"
API = "openai"  # the metrics' name of this API
_LOOSE = ConfigDict(extra="ignore", strict=True)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatBody(BaseModel):
    model_config = _LOOSE

    model: str = ""
    messages: list[dict[str, Any]] = Field(default_factory=list)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


class ResponsesBody(BaseModel):
    model_config = _LOOSE

    model: str = ""
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    tools: list[Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


# --------------------------------------------------------------------------- reading a request


def _refuse(body: ChatBody | ResponsesBody) -> None:
    if isinstance(body, ChatBody):
        if body.n not in (None, 1):
            raise Unsupported(f"n={body.n}: one choice per request is supported; send n=1", param="n")
        if body.functions:
            raise Unsupported("functions are not supported", param="functions")
        if body.logprobs or body.top_logprobs:
            raise Unsupported("logprobs are not supported", param="logprobs")
        if body.logit_bias:
            raise Unsupported("logit_bias is not supported", param="logit_bias")
    if body.tools:
        raise Unsupported("tools are not supported", param="tools")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise Unsupported(f"{name} is not supported; leave it 0 or unset", param=name)


def _content(content: Any, where: str, limits: GenerationLimits, http: HttpSettings) -> tuple[str, list[ImageInput]]:
    """A message's content (a string or parts) as its text and its images. The parts' texts are
    joined with newlines; images come out separately (see `_messages` for where they go)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"'{where}' must be a string or a list of content parts")
    texts: list[str] = []
    images: list[ImageInput] = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in {"text", "input_text", "output_text"} and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in {"image_url", "input_image"}:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url  # chat: {"url": ...}; responses: the URL
            if not isinstance(url, str) or not url:
                raise RequestError(f"'{at}.image_url' must hold the image's URL (a data: URL)")
            images.append(image_from(url, f"'{at}.image_url'", limits, http))
        else:
            raise RequestError(f"'{at}' must be a text or image part, got type {json.dumps(kind)[:40]}")
    return "\n".join(texts), images


def _messages(
    raw: list[dict[str, Any]], where: str, limits: GenerationLimits, http: HttpSettings
) -> tuple[list[dict[str, Any]], list[ImageInput]]:
    """Messages for the model room, and their images."""
    messages: list[dict[str, Any]] = []
    images: list[ImageInput] = []
    first_user = first_user_turn([message.get("role") if isinstance(message, dict) else None for message in raw])
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise RequestError(f"'{where}[{index}]' must be an object with role and content")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"'{where}[{index}].role' must be system, developer, user or assistant")
        text, found = _content(message.get("content", ""), f"{where}[{index}].content", limits, http)
        images += found
        messages.append({"role": _ROLES[role], "content": images_before_text(text, len(found), index, first_user)})
    return messages, images


def _response_format(value: dict[str, Any] | None, where: str, limits: GenerationLimits) -> ResponseFormat | None:
    """`response_format` (chat) or `text.format` (responses): text, json_object or json_schema."""
    if value is None:
        return None
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ResponseFormat("json")
    if kind == "json_schema":
        spec = value.get("json_schema", value)  # chat nests it; responses does not
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return ResponseFormat("json") if schema is None else schema_response_format(schema, limits, f"'{where}.schema'")
    raise RequestError(f"'{where}.type' must be text, json_object or json_schema")


@dataclass(frozen=True)
class Parsed:
    endpoint: str  # "chat.completions" or "responses"
    model: str
    stream: bool
    include_usage: bool
    request: GenerationRequest
    image: ImageInput | None


def parse(endpoint: str, data: Any, limits: GenerationLimits, http: HttpSettings) -> Parsed:
    """`data`: the decoded JSON body of /v1/chat/completions or /v1/responses. Cheap: no model work."""
    if endpoint == "chat.completions":
        chat = validated(ChatBody, data)
        _refuse(chat)
        messages, images = _messages(chat.messages, "messages", limits, http)
        stop = [chat.stop] if isinstance(chat.stop, str) else chat.stop
        knobs = Knobs(
            max_tokens=chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            seed=chat.seed,
            stop=stop,
            response_format=_response_format(chat.response_format, "response_format", limits),
            names=(
                ("max_tokens", "max_completion_tokens" if chat.max_completion_tokens is not None else "max_tokens"),
            ),
        )
        model, stream = chat.model, chat.stream
        include_usage = bool((chat.stream_options or {}).get("include_usage"))
    else:
        body = validated(ResponsesBody, data)
        _refuse(body)
        raw = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
        raw = [item for item in raw if item.get("type", "message") == "message"]
        if body.instructions:
            raw = [{"role": "system", "content": body.instructions}, *raw]
        messages, images = _messages(raw, "input", limits, http)
        text_format = (body.text or {}).get("format")
        knobs = Knobs(
            max_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            response_format=_response_format(text_format, "text.format", limits),
            names=(("max_tokens", "max_output_tokens"),),
        )
        model, stream, include_usage = body.model, body.stream, True
    if not model:
        raise HttpError("you must provide a model parameter", param="model")
    image = one_image(images, "the messages")
    request = GenerationRequest(checked_messages(messages, limits), None, generation_params(knobs, limits))
    return Parsed(endpoint, model, stream, include_usage, request, image)


# --------------------------------------------------------------------------- replies


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason is FinishReason.LENGTH else "stop"


def _usage(result: GenerationResult) -> dict[str, int]:
    total = result.input_tokens + result.generated_tokens
    return {"prompt_tokens": result.input_tokens, "completion_tokens": result.generated_tokens, "total_tokens": total}


class ChatReply:
    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def whole(self, result: GenerationResult) -> dict[str, Any]:
        message = {"role": "assistant", "content": result.text, "refusal": None}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(result)}],
            "usage": _usage(result),
        }

    def chunk(self, delta: dict[str, Any], finish: str | None, usage: bool) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return body | ({"usage": None} if usage else {})

    async def stream(self, first: Any, rest: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[bytes]:
        yield sse(self.chunk({"role": "assistant", "content": ""}, None, include_usage))
        event = first
        try:
            while not isinstance(event, GenerationResult):
                yield sse(self.chunk({"content": event.text}, None, include_usage))
                event = await rest.__anext__()
        except Exception as exc:  # after the 200: an error event, then the end, as vLLM streams it
            yield sse(error_body(exc))
            yield b"data: [DONE]\n\n"
            return
        yield sse(self.chunk({}, _finish(event), include_usage))
        if include_usage:
            usage = {k: v for k, v in self.chunk({}, None, False).items() if k != "choices"}
            yield sse(usage | {"choices": [], "usage": _usage(event)})
        yield b"data: [DONE]\n\n"


class ResponsesReply:
    def __init__(self, model: str) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.sequence = 0

    def _message(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" or text else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def whole(self, result: GenerationResult | None, text: str = "") -> dict[str, Any]:
        status = "in_progress" if result is None else "completed" if _finish(result) == "stop" else "incomplete"
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [] if result is None else [self._message(result.text, "completed")],
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": None,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
        }
        if result is not None:
            body["usage"] = {
                "input_tokens": result.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": result.generated_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": result.input_tokens + result.generated_tokens,
            }
        return body

    def _event(self, kind: str, **fields: Any) -> bytes:
        self.sequence += 1
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        return f"event: {kind}\n".encode() + sse(body)

    async def stream(self, first: Any, rest: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[bytes]:
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        yield self._event("response.created", response=self.whole(None))
        yield self._event("response.in_progress", response=self.whole(None))
        yield self._event("response.output_item.added", output_index=0, item=self._message("", "in_progress"))
        part = {"type": "output_text", "text": "", "annotations": []}
        yield self._event("response.content_part.added", **where, part=part)
        event = first
        try:
            while not isinstance(event, GenerationResult):
                yield self._event("response.output_text.delta", **where, delta=event.text)
                event = await rest.__anext__()
        except Exception as exc:
            yield self._event("error", **error_body(exc)["error"])
            return
        yield self._event("response.output_text.done", **where, text=event.text)
        yield self._event("response.content_part.done", **where, part=part | {"text": event.text})
        yield self._event("response.output_item.done", output_index=0, item=self._message(event.text, "completed"))
        done = self.whole(event)
        yield self._event(
            "response.completed" if done["status"] == "completed" else "response.incomplete", response=done
        )


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n\n"


_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error"}
_CODES = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}


def error_body(error: BaseException) -> dict[str, Any]:
    status = status_for(error, overloaded=429)
    kind = _TYPES.get(status.code, "server_error" if status.code >= 500 else "invalid_request_error")
    param = getattr(error, "param", None)
    return {
        "error": {"message": message_of(error, status), "type": kind, "param": param, "code": _CODES.get(status.code)}
    }


def error_response(error: BaseException) -> Response:
    status = status_for(error, overloaded=429)  # what OpenAI's clients back off on
    return JSONResponse(error_body(error), status.code, headers=retry_headers(status))


def models(served: Served) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(served)]}


def model_card(served: Served) -> dict[str, Any]:
    return {"id": served.ready().model_id, "object": "model", "created": int(served.started), "owned_by": "lumen-vlm"}


async def answer(
    request: Request, served: Served, parsed: Parsed, image: bytes | None, tracker: RequestTracker
) -> Response:
    service = served.ready()
    model = served.model_name(parsed.model)
    generation = GenerationRequest(parsed.request.messages, image, parsed.request.params)
    events = engine_events(service, generation, tracker)
    reply = ChatReply(model) if parsed.endpoint == "chat.completions" else ResponsesReply(model)
    if not parsed.stream:
        return JSONResponse(reply.whole(await collected(events, request)))
    first, rest = await first_then_rest(events)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # a proxy must not hold the stream
    return StreamingResponse(reply.stream(first, rest, parsed.include_usage), media_type=SSE, headers=headers)
