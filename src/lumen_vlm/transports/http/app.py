"""The HTTP front door: the Ollama and OpenAI APIs, metrics and the page, as one Starlette app.

Why Starlette on uvicorn: an ASGI server where an open stream is a coroutine (as on the gRPC
side, an idle or slow client holds no thread), the smallest well-kept framework that streams
responses and tells when a client leaves. FastAPI's request models and OpenAPI page were not
needed: each API must answer bad input in its own error shape, which it does here by hand.

Every request runs the same steps, whatever the API: the key (401), the model being ready (503),
the body read within its bound (413) and its time (408), then decoded and checked off the event
loop (a 27 MB base64 body takes tens of milliseconds), an allowed image URL fetched, the image's
size and signature checked, and the request submitted to the engine the gRPC front door submits
to: one admission, one queue, one set of limits. Errors are the API's own shape (`ollama`,
`openai_api`); statuses come from `errors.status_for`, the one mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ...engine import ClientGone
from ...metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ...text import shown
from . import ollama, openai_api
from .common import Served, read_body
from .errors import status_for
from .inputs import ImageURL, checked_image, decode_body, fetch_image

log = logging.getLogger(__name__)

OLLAMA_RUNNING = "Ollama is running"  # what Ollama's health probes read at GET /
ErrorResponse = Callable[[BaseException], Response]


def page_html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def build_app(served: Served) -> Starlette:
    page = page_html()

    async def root(request: Request) -> Response:
        """A browser gets the page; Ollama's probes (and HEAD) get Ollama's text."""
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(page)
        return PlainTextResponse(OLLAMA_RUNNING)

    async def health(request: Request) -> Response:
        try:
            served.ready()
        except Exception as exc:
            return JSONResponse({"status": str(exc)}, 503)
        return JSONResponse({"status": "ok"})

    def guarded(handler: Callable[[Request], Awaitable[Response]], errors: ErrorResponse) -> Any:
        """`handler` behind the key check, every error answered in the API's shape."""

        async def endpoint(request: Request) -> Response:
            try:
                served.authorize(request)
                return await handler(request)
            except ClientGone:
                return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
            except Exception as exc:
                return _refusal(request, exc, errors)

        return endpoint

    async def metrics(request: Request) -> Response:
        return Response(served.ready().metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    async def body_json(request: Request) -> Any:
        body = await read_body(request, served.max_body_bytes, served.settings.admission.upload_idle_timeout_s)
        return await anyio.to_thread.run_sync(decode_body, body)

    def generation(api: Any, endpoint: str) -> Callable[[Request], Awaitable[Response]]:
        """A generating endpoint of `api` (ollama or openai_api)."""

        async def handler(request: Request) -> Response:
            served.ready()
            data = await body_json(request)
            limits, http = served.settings.limits, served.http
            tracker = served.ready().metrics.track("http", f"{api.API}.{endpoint}")  # one label, refused or served
            try:
                parsed = await anyio.to_thread.run_sync(api.parse, endpoint, data, limits, http)
                image = parsed.image
                if isinstance(image, ImageURL):
                    image = await fetch_image(image, limits, http)
                if image is not None:
                    image = checked_image(image, limits)
            except Exception as exc:
                tracker.failed(exc)
                raise
            return await api.answer(request, served, parsed, image, tracker)

        return handler

    async def ollama_show(request: Request) -> Response:
        return JSONResponse(ollama.show(served, await body_json(request)))

    async def openai_model(request: Request) -> Response:
        served.model_name(request.path_params["name"])
        return JSONResponse(openai_api.model_card(served))

    def simple(make: Callable[[], Any]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return JSONResponse(make())

        return handler

    o, oa = ollama.error_response, openai_api.error_response
    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", guarded(metrics, o), methods=["GET"]),
        Route("/api/generate", guarded(generation(ollama, "generate"), o), methods=["POST"]),
        Route("/api/chat", guarded(generation(ollama, "chat"), o), methods=["POST"]),
        Route("/api/tags", guarded(simple(lambda: ollama.tags(served)), o), methods=["GET"]),
        Route("/api/ps", guarded(simple(lambda: ollama.running(served)), o), methods=["GET"]),
        Route("/api/show", guarded(ollama_show, o), methods=["POST"]),
        Route("/api/version", guarded(simple(ollama.version), o), methods=["GET"]),
        Route("/v1/chat/completions", guarded(generation(openai_api, "chat.completions"), oa), methods=["POST"]),
        Route("/v1/responses", guarded(generation(openai_api, "responses"), oa), methods=["POST"]),
        Route("/v1/models", guarded(simple(lambda: openai_api.models(served)), oa), methods=["GET"]),
        Route("/v1/models/{name:path}", guarded(openai_model, oa), methods=["GET"]),
    ]
    return Starlette(routes=routes)


def _refusal(request: Request, exc: Exception, errors: ErrorResponse) -> Response:
    status = status_for(exc, overloaded=429)
    if status.code >= 500 and status.code != 503:
        log.exception("%s %s failed with an internal error", request.method, shown(request.url.path))
    else:
        log.info("%s %s answered %d: %s", request.method, shown(request.url.path), status.code, exc)
    return errors(exc)
