"""Our server's gRPC front door: `home_native.v1.Inference` on grpc's asyncio server.

Why asyncio. On grpc's synchronous server every open call holds a worker thread, so a
client that opens streams and sends nothing takes the workers one by one, and with them
health checks, which are calls too (38 idle streams made a default server unreachable).
Here an open stream is a coroutine: idle streams cost a few kilobytes, health and
capability calls are answered on the event loop whatever the Infer load, and nothing the
event loop runs ever blocks. Each stream draws its requests' responses in a thread pool, one
engine event per draw (`respond` and `FastVLMService.answer`, the same code the Lumen hub
runs on its own synchronous server); the engine does the model work in its own threads.

What a stream may cost is bounded here:
* at most `admission.max_streams` Infer streams are open at once; one more is refused with
  RESOURCE_EXHAUSTED (health never counts);
* a stream with no request in flight that receives nothing for
  `admission.stream_idle_timeout_s` is ended with UNAVAILABLE;
* an unfinished chunked upload that receives no chunk for `admission.upload_idle_timeout_s`
  is dropped and answered DEADLINE_EXCEEDED; the stream goes on;
* a message that cannot be read (not UTF-8 where the protocol says text) is answered
  INVALID_ARGUMENT (`wire.read_infer_request`); the stream goes on.
Until the model is ready (`install`), health says NOT_SERVING and every complete request is
answered UNAVAILABLE; chunks are reassembled by the normal rules all along.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import empty_pb2

from ..engine.errors import CANCELLED_AT_SHUTDOWN, Unavailable
from ..fastvlm.call_control import CallControl, CallEnd
from ..fastvlm.chunks import ChunkAssembler, CompleteRequest, UploadBudget, upload_budget_bytes
from ..fastvlm.exceptions import RequestError
from ..fastvlm.fastvlm_service import FastVLMService, abandoned_responses, error_response, respond
from ..proto import ml_service_pb2
from ..resources.settings import VLMSettings
from ..text import shown_id
from .api_key import bearer_key_matches
from .wire import UnreadableRequest, read_infer_request

log = logging.getLogger(__name__)

INFERENCE_SERVICE = ml_service_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
InferResponse = ml_service_pb2.InferResponse

# Threads for model work: every running and every waiting generation holds one (a waiting one
# blocks in admission), plus a few for refusals and chunk bookkeeping meanwhile.
_SPARE_THREADS = 4

_END = object()  # the request stream ended
_SILENT = object()  # nothing arrived within the timeout
_DONE = object()  # a response iterator is exhausted

# What every call hears before `install`: the front door answers it itself, so there is no
# stand-in service while the model loads.
MODEL_LOADING = "the model is still loading"


def keepalive_options() -> list[tuple[str, int]]:
    """HTTP/2 keepalive: find dead peers, and accept the pings live clients send.

    The server pings a connection that has been quiet for a minute and drops it if no answer
    comes within 20 s (a peer that vanished without closing its TCP connection). Client pings
    are accepted every 5 s, with or without calls: the Go SDK pings every 10 s, and grpc's
    default (one ping per 5 minutes without data) would answer it with GOAWAY "too_many_pings".
    (`min_ping_interval_without_data_ms` is the bound on *received* pings, despite its name.)
    """
    return [
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 2),  # grpc's default: a ping flood still gets GOAWAY
    ]


class ThreadSideCall:
    """What the synchronous service reads of an asyncio call, safe to read from any thread.

    The aio context belongs to the event loop; the service only needs to know whether the
    call is still on and how much time it has left, so both are captured here.
    """

    def __init__(self, context: Any) -> None:
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self.ended = CallEnd()  # set on the event loop; a waiting request then leaves the queue at once
        context.add_done_callback(self.ended.set)

    def is_active(self) -> bool:
        return not self.ended.is_set()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()


class _StreamReader:
    """The stream's messages, read ahead by one, with a timeout on each wait.

    A separate task reads, so that giving up on a wait never cancels grpc's read itself.
    """

    def __init__(self, request_iterator: AsyncIterator[Any]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self._task = asyncio.ensure_future(self._pump(request_iterator))
        self._waiting: asyncio.Future[Any] | None = None

    async def _pump(self, request_iterator: AsyncIterator[Any]) -> None:
        try:
            async for message in request_iterator:
                await self._queue.put(message)
        except grpc.RpcError:
            log.debug("request stream ended by the client", exc_info=True)
        await self._queue.put(_END)

    async def next(self, timeout: float) -> Any:
        """The next message, `_END`, or `_SILENT` when nothing came within `timeout` seconds."""
        if self._waiting is None:
            self._waiting = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._waiting}, timeout=max(0.0, timeout))
        if not done:
            return _SILENT
        message, self._waiting = self._waiting.result(), None
        return message

    def close(self) -> None:
        for task in (self._waiting, self._task):
            if task is not None:
                task.cancel()


class AsyncInference:
    """The `Inference` service on an asyncio server, over a `FastVLMService` once one is installed."""

    def __init__(self, settings: VLMSettings) -> None:
        self.settings = settings
        self.service: FastVLMService | None = None
        self.uploads = UploadBudget(upload_budget_bytes(settings))
        # A stream has at most one draw in flight, and a draw waits on the engine (a queued or
        # running request) for no longer than its next event: one thread per open stream is
        # the most ever busy. The pool starts its threads only as they are needed.
        self._executor = ThreadPoolExecutor(
            max_workers=settings.admission.max_streams + _SPARE_THREADS, thread_name_prefix="infer"
        )
        self._open_streams = 0  # touched on the event loop only
        self._abandoned = asyncio.Event()

    def install(self, service: FastVLMService) -> None:
        self.service = service

    def close(self) -> None:
        """Stop taking model work; what is still running finishes on its own (see VLMServer)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's methods, Infer with our own deserializer (see `wire`)."""
        serialize = InferResponse.SerializeToString
        capability = ml_service_pb2.Capability.SerializeToString
        empty = empty_pb2.Empty.FromString
        methods = {
            "Infer": grpc.stream_stream_rpc_method_handler(
                self.Infer, request_deserializer=read_infer_request, response_serializer=serialize
            ),
            "GetCapabilities": grpc.unary_unary_rpc_method_handler(
                self.GetCapabilities, request_deserializer=empty, response_serializer=capability
            ),
            "StreamCapabilities": grpc.unary_stream_rpc_method_handler(
                self.StreamCapabilities, request_deserializer=empty, response_serializer=capability
            ),
            "Health": grpc.unary_unary_rpc_method_handler(
                self.Health, request_deserializer=empty, response_serializer=empty_pb2.Empty.SerializeToString
            ),
        }
        return grpc.method_handlers_generic_handler(INFERENCE_SERVICE, methods)

    # ------------------------------------------------------------------ capabilities, health

    async def _ready_service(self, context: Any) -> FastVLMService:
        if self.service is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, MODEL_LOADING)
        assert self.service is not None
        return self.service

    async def _authorize(self, context: Any) -> None:
        """With an API key configured, a call must carry it: metadata `authorization: Bearer KEY`
        (as HTTP sends it). Health never needs it: probes must always be answered."""
        key = self.settings.server.api_key
        if key is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not bearer_key_matches(str(given), key):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid API key is required: send metadata 'authorization: Bearer KEY'",
            )

    async def GetCapabilities(self, request: Any, context: Any) -> ml_service_pb2.Capability:
        await self._authorize(context)
        return (await self._ready_service(context)).capability()

    async def StreamCapabilities(self, request: Any, context: Any) -> AsyncIterator[ml_service_pb2.Capability]:
        await self._authorize(context)
        yield (await self._ready_service(context)).capability()

    async def Health(self, request: Any, context: Any) -> empty_pb2.Empty:
        """Empty while serving; UNAVAILABLE while loading and once shutdown began."""
        if (await self._ready_service(context)).shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return empty_pb2.Empty()

    # ------------------------------------------------------------------ Infer

    async def Infer(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[InferResponse]:
        """Answer every request of the stream, in order, within the stream limits above."""
        await self._authorize(context)
        max_streams = self.settings.admission.max_streams
        if self._open_streams >= max_streams:
            log.info("refused an Infer stream: %d are open (max_streams=%d)", self._open_streams, max_streams)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open Infer streams ({max_streams}, max_streams); close idle streams or retry later",
            )
        self._open_streams += 1
        try:
            async for response in self._serve_stream(request_iterator, context):
                yield response
        finally:
            self._open_streams -= 1

    async def _serve_stream(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[InferResponse]:
        admission = self.settings.admission
        reader = _StreamReader(request_iterator)
        assembler = ChunkAssembler(self.settings.limits.max_payload_bytes, budget=self.uploads)
        call = ThreadSideCall(context)
        control = CallControl(call, call.ended)
        try:
            while True:
                upload_due = assembler.next_expiry(admission.upload_idle_timeout_s)
                wait_s = admission.stream_idle_timeout_s if upload_due is None else upload_due - time.monotonic()
                message = await reader.next(wait_s)
                if message is _END:
                    break
                if message is _SILENT:
                    if upload_due is None:
                        await self._end_idle_stream(context)  # raises: the call ends
                    responses, correlation_id = self._expired_uploads(assembler), ""
                else:
                    responses, correlation_id = self._responses_to(message, assembler, control)
                answered = False
                async for response in self._drawn_in_thread(responses, call, correlation_id):
                    answered = True
                    yield response
                if answered and message is not _SILENT:
                    # Busy answering is not the client's silence. (A chunk that is only stored
                    # answers nothing, so one upload's chunks never keep another alive.)
                    assembler.touch()
        finally:
            reader.close()
            abandoned = assembler.abandon()
        for response in abandoned_responses(abandoned):
            yield response

    def _responses_to(
        self, message: Any, assembler: ChunkAssembler, control: CallControl
    ) -> tuple[Iterator[InferResponse], str]:
        """The (lazy) answers to one message, and the id a request in it is answered under."""
        if isinstance(message, UnreadableRequest):
            return iter([_unreadable_response(message, assembler)]), ""
        # Named here, so that an answer abandoned at shutdown has it too.
        correlation_id = message.correlation_id or uuid.uuid4().hex
        return respond(message, assembler, control, self._answer, correlation_id), correlation_id

    async def _end_idle_stream(self, context: Any) -> None:
        idle_s = self.settings.admission.stream_idle_timeout_s
        log.info("closing an Infer stream idle for %g s (stream_idle_timeout_s)", idle_s)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"the stream was idle for {idle_s:g} s with no request in flight (stream_idle_timeout_s); "
            "open a new stream for the next request",
        )

    def _expired_uploads(self, assembler: ChunkAssembler) -> Iterator[InferResponse]:
        return abandoned_responses(assembler.expire(self.settings.admission.upload_idle_timeout_s))

    def _answer(self, request: CompleteRequest, control: CallControl) -> Iterator[InferResponse]:
        """A complete request, answered by the service, or UNAVAILABLE while the model loads."""
        if self.service is None:
            return iter([error_response(request.correlation_id, Unavailable(MODEL_LOADING), 0.0)])
        return self.service.answer(request, control)

    async def _drawn_in_thread(
        self, responses: Iterator[InferResponse], call: ThreadSideCall, correlation_id: str
    ) -> AsyncIterator[Any]:
        """`responses`, each drawn by the thread pool, off the event loop: one engine event per draw.

        Left before the end only when the call is over (the client cancelled or went away,
        or the server is stopping): the generation is told (`call.ended` cancels its engine
        request, which leaves the batch at the next step and gives its slot back) and closed
        in the pool once the draw in progress returns. When shutdown cannot wait for a draw any
        longer (`abandon_in_flight`), the request in flight is answered UNAVAILABLE here, under
        `correlation_id`.
        """
        pending: Future[Any] | None = None
        finished = False
        abandoned = asyncio.ensure_future(self._abandoned.wait())
        try:
            while True:
                pending = self._executor.submit(next, responses, _DONE)
                draw = asyncio.wrap_future(pending)
                await asyncio.wait({draw, abandoned}, return_when=asyncio.FIRST_COMPLETED)
                if not draw.done():
                    if correlation_id:
                        yield error_response(correlation_id, Unavailable(CANCELLED_AT_SHUTDOWN))
                    return
                response, pending = draw.result(), None
                if response is _DONE:
                    finished = True
                    return
                yield response
        finally:
            abandoned.cancel()
            if not finished:
                call.ended.set()
                self._close_after(responses, pending)

    async def abandon_in_flight(self) -> None:
        """Shutdown's last step: every stream stops waiting for the model and answers at once."""
        self._abandoned.set()

    def _close_after(self, responses: Iterator[Any], pending: Future[Any] | None) -> None:
        """Close `responses` in the pool once the draw `pending` (if any) has returned."""
        close = getattr(responses, "close", None)
        if not callable(close):
            return

        def submit_close(done: Future[Any] | None = None) -> None:
            if done is not None and done.cancelled():
                # Cancelled by the pool's shutdown, which holds the pool's lock while it runs
                # this callback: submitting would wait for that lock forever. Nothing is
                # drawing from `responses`, so it is closed here.
                close()
                return
            with contextlib.suppress(RuntimeError):  # a pool shut down: the process is exiting
                self._executor.submit(close)

        if pending is None:
            submit_close()
        else:
            pending.add_done_callback(submit_close)


def _unreadable_response(message: UnreadableRequest, assembler: ChunkAssembler) -> InferResponse:
    """INVALID_ARGUMENT for a message that could not be read; an upload it belonged to fails."""
    assembler.reject(message.correlation_id, message.seq, message.total)
    log.info("correlation_id=%s error=INVALID_ARGUMENT %s", shown_id(message.correlation_id), message.reason)
    return error_response(message.correlation_id, RequestError(message.reason))
