"""What both HTTP APIs share once a request is read: the served model's names, the key check,
bounded bodies, and a submitted generation seen from the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from ...engine import ClientGone, GenerationEvent, GenerationResult, Unavailable
from ...fastvlm.fastvlm_model import GenerationRequest
from ...metrics import RequestTracker
from ...resources.settings import HttpSettings, VLMSettings, default_max_body_bytes
from ...text import SHOWN_CHARS
from ..api_key import bearer_key_matches
from .errors import BodyTimeout, BodyTooLarge, NotFound, Unauthorized

if TYPE_CHECKING:
    from ...fastvlm.fastvlm_service import FastVLMService

MODEL_LOADING = "the model is still loading"
LATEST = ":latest"


@dataclass
class Served:
    """The front door's view of the service: set once the model is ready (`install`)."""

    settings: VLMSettings
    http: HttpSettings
    service: FastVLMService | None = None
    started: float = field(default_factory=time.time)

    @property
    def max_body_bytes(self) -> int:
        return self.http.max_body_bytes or default_max_body_bytes(self.settings.limits)

    def ready(self) -> FastVLMService:
        service = self.service
        if service is None:
            raise Unavailable(MODEL_LOADING)
        if service.shutting_down:
            raise Unavailable("the server is shutting down")
        return service

    def model_name(self, requested: str) -> str:
        """The served model's id, if `requested` names it (its id or an alias, with or without
        ":latest"); NotFound otherwise, as Ollama and OpenAI answer an unknown model."""
        service = self.ready()
        wanted = requested.removesuffix(LATEST)
        names = {service.model_id, *self.http.model_aliases}
        if wanted in {name.removesuffix(LATEST) for name in names}:
            return service.model_id
        # json.dumps: Ollama's quoting, and every control character escaped
        raise NotFound(f"model {json.dumps(requested[:SHOWN_CHARS])} not found", param="model")

    def authorize(self, request: Request) -> None:
        """With an API key configured, the request must carry it as a Bearer token."""
        key = self.settings.server.api_key
        if key is None:
            return
        if not bearer_key_matches(request.headers.get("authorization", ""), key):
            raise Unauthorized("a valid API key is required: send it as 'Authorization: Bearer KEY'")


async def read_body(request: Request, max_bytes: int, idle_timeout_s: float) -> bytes:
    """The whole body, at most `max_bytes` (413 beyond, before reading it where the length is
    declared), each part arriving within `idle_timeout_s` (408 otherwise: a client that stalls
    mid-body holds nothing for long)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"the request body is {declared} bytes, more than the limit of {max_bytes} bytes")
    body = bytearray()
    parts = request.stream().__aiter__()
    while True:
        try:
            part = await asyncio.wait_for(parts.__anext__(), idle_timeout_s)
        except StopAsyncIteration:
            return bytes(body)
        except asyncio.TimeoutError:
            raise BodyTimeout(f"the request body stalled for {idle_timeout_s:g} s (upload_idle_timeout_s)") from None
        body += part
        if len(body) > max_bytes:
            raise BodyTooLarge(f"the request body is more than the limit of {max_bytes} bytes")


async def engine_events(
    service: FastVLMService, request: GenerationRequest, tracker: RequestTracker
) -> AsyncIterator[GenerationEvent]:
    """Submit `request` and yield its events on the event loop, never blocking it: the handle
    wakes the loop when an event arrives. Leaving early (a client gone) cancels the request,
    which leaves the batch at the next step."""
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()

    def wake() -> None:  # on an engine thread
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(arrived.set)

    handle = service.engine.submit(request)
    handle.on_event(wake)
    ended = False
    try:
        while True:
            event = handle.poll()
            if event is None:
                await arrived.wait()
                arrived.clear()
                continue
            if isinstance(event, BaseException):
                ended = True
                tracker.failed(event)
                raise event
            if isinstance(event, GenerationResult):  # counted before it is read: the reader stops there
                ended = True
                tracker.finished(event)
                yield event
                return
            tracker.delta(event)
            yield event
    finally:
        if not ended:
            tracker.failed(ClientGone("the client went away"))
        handle.cancel()  # a no-op once it ended


async def until_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body is read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collected(events: AsyncIterator[GenerationEvent], request: Request) -> GenerationResult:
    """The result of a non-streamed generation; a client that goes meanwhile cancels it."""

    async def result() -> GenerationResult:
        async for event in events:
            if isinstance(event, GenerationResult):
                return event
        raise ClientGone("the generation ended without a result")  # pragma: no cover - engine contract

    waiting = asyncio.ensure_future(result())
    gone = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not waiting.done():
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, ClientGone):
            await waiting
        raise ClientGone("the client went away")
    return waiting.result()


async def first_then_rest(events: AsyncIterator[GenerationEvent]) -> tuple[GenerationEvent, AsyncIterator[Any]]:
    """The first event (so a refusal is an HTTP status, not a broken stream), and the rest."""
    first = await events.__anext__()
    return first, events
