"""The gRPC face of the model: the Lumen `Inference` service for FastVLM.

Protocol semantics live here and nowhere else: chunk reassembly (through `chunks`) and meta
validation (through `request_meta`), turning requests into engine submissions and the engine's
events into `InferResponse`s, and the one mapping of errors to codes (`error_code_for`).
Admission, batching, deadlines and cancellation are the engine's (`lumen_vlm.engine`). No ONNX Runtime,
no numpy.

Threading. `answer` returns a lazy response iterator; each `next()` waits for the request's
next engine event, so every response is yielded the moment its event arrives. Two front
doors draw on it: `Infer` here, the synchronous servicer the Lumen hub hosts on its own grpc
server (one worker thread per stream: see `server.server_thread_pool_size`), and our own
server's asyncio front door (`transports.grpc_aio`), which reads streams itself and draws in a
thread pool. Both go through `respond`.

Memory. A stream's unfinished chunked uploads hold at most one payload and its meta, and all
streams' together at most `chunks.upload_budget_bytes`, meta counted (a chunk beyond either
fails its upload with UNAVAILABLE).

Cancellation. A client that cancels or disconnects cancels its engine request (through the
call's termination callback, and when the response iterator is closed): the engine stops it
within one decode step and frees its slot. The call's deadline goes to the engine with the
request; passing it answers DEADLINE_EXCEEDED. Only `is_active`, `add_callback` and
`time_remaining` of the context are used, each optionally, so a hub may pass a context of its own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2
from lumen_resources.result_schemas.text_generation_v1 import TextGenerationV1

from .. import __version__
from ..engine import ClientGone, DeadlineExceeded, Engine, GenerationResult, TextDelta, Unavailable
from ..generation import RESPONSE_FORMAT_KINDS
from ..metrics import RequestTracker, ServingMetrics
from ..proto import ml_service_pb2, ml_service_pb2_grpc
from ..registry import TaskRegistry, TaskSpec, UnknownTaskError
from ..resources.settings import VLMSettings
from ..text import SHOWN_TEXT_CHARS, shown, shown_id
from .call_control import CallControl, watch_termination
from .chunks import ChunkAssembler, CompleteRequest, UploadBudget, UploadsBusy, upload_budget_bytes
from .exceptions import InputError
from .fastvlm_model import FastVLMModelManager, GenerationRequest
from .image import IMAGE_MIMES
from .request_meta import MAX_CORRELATION_ID_BYTES, build_generation_request, check_correlation_id

log = logging.getLogger(__name__)

VLM_GENERATE = "vlm_generate"
VLM_GENERATE_STREAM = "vlm_generate_stream"
RESULT_SCHEMA = "text_generation_v1"
JSON_MIME = f"application/json;schema={RESULT_SCHEMA}"
TEXT_MIME = "text/plain;charset=utf-8"

ErrorCode = ml_service_pb2.ErrorCode


# --------------------------------------------------------------------------- errors


def error_code_for(exc: BaseException) -> int:
    """The one place where exceptions (the engine's, the model room's, the protocol's) become error codes."""
    if isinstance(exc, InputError | UnknownTaskError):  # RequestError is an InputError
        return ErrorCode.ERROR_CODE_INVALID_ARGUMENT
    if isinstance(exc, Unavailable):  # busy, shutting down, not ready
        return ErrorCode.ERROR_CODE_UNAVAILABLE
    if isinstance(exc, DeadlineExceeded):
        return ErrorCode.ERROR_CODE_DEADLINE_EXCEEDED
    return ErrorCode.ERROR_CODE_INTERNAL


def _log_refusal(correlation_id: str, task: str, exc: BaseException) -> None:
    """One line for a request answered with an error the client caused or may retry."""
    name = ErrorCode.Name(error_code_for(exc)).removeprefix("ERROR_CODE_")
    log.info("correlation_id=%s task=%s error=%s %s", shown_id(correlation_id), shown(task), name, exc)


# --------------------------------------------------------------------------- responses


def error_response(
    correlation_id: str, exc: BaseException, lat_ms: float | None = None
) -> ml_service_pb2.InferResponse:
    message = str(exc) or type(exc).__name__
    code = error_code_for(exc)
    if code == ErrorCode.ERROR_CODE_INTERNAL:
        message = "internal error while serving the request; see the server log"
    meta = {} if lat_ms is None else {"lat_ms": f"{lat_ms:.1f}"}
    return ml_service_pb2.InferResponse(
        correlation_id=correlation_id,
        is_final=True,
        error=ml_service_pb2.Error(code=code, message=message, detail=type(exc).__name__),
        meta=meta,
    )


def partial_response(correlation_id: str, delta: TextDelta, seq: int) -> ml_service_pb2.InferResponse:
    return ml_service_pb2.InferResponse(
        correlation_id=correlation_id,
        is_final=False,
        result=delta.text.encode("utf-8"),
        result_mime=TEXT_MIME,
        seq=seq,
        meta={"generated_tokens": str(delta.generated_tokens)},
    )


def result_json(
    result: GenerationResult,
    request: GenerationRequest,
    model_id: str,
    streaming_chunks: int | None,
) -> bytes:
    """The text_generation_v1 document, validated against lumen-resources' schema."""
    sampling = request.params.sampling
    document = TextGenerationV1.model_validate(
        {
            "text": result.text,
            "finish_reason": result.finish_reason.value,
            "generated_tokens": result.generated_tokens,
            "input_tokens": result.input_tokens,
            "model_id": model_id,
            "metadata": {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": result.max_new_tokens,
                "seed": sampling.seed,
                "generation_time_ms": round(result.generation_time_ms, 3),
                "streaming_chunks": streaming_chunks,
            },
        }
    )
    return document.model_dump_json(exclude_none=True).encode("utf-8")


# --------------------------------------------------------------------------- the service


class FastVLMService(ml_service_pb2_grpc.InferenceServicer):
    """Lumen `Inference` servicer over a ready `FastVLMModelManager`.

    Construct it with a loaded manager and the settings (tests do), or with `from_settings` /
    `from_config`, which load the model and return a servicer ready to serve. `model_id` is
    the id results and capabilities report (the manager's by default); `upload_budget` bounds
    the bytes of unfinished chunked uploads across all streams (`upload_budget_bytes` by default);
    `engine` is the engine to submit to (by default one of its own over `manager`).
    """

    def __init__(
        self,
        manager: FastVLMModelManager,
        settings: VLMSettings,
        *,
        owns_manager: bool = False,
        model_id: str | None = None,
        upload_budget: int | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.manager = manager
        self.settings = settings
        self.model_id = model_id or manager.describe().model_id
        self._owns_manager = owns_manager  # close() closes only a manager we built
        self.uploads = UploadBudget(upload_budget_bytes(settings) if upload_budget is None else upload_budget)
        self.engine = engine or Engine(manager, settings.admission, settings.limits)
        self._owns_engine = engine is None
        self.metrics = ServingMetrics(self.engine, manager)  # both front doors record here
        self._registry = self._build_registry()
        self._closed = False
        self._capability: ml_service_pb2.Capability | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(cls, settings: VLMSettings, model_dir: Path | str) -> FastVLMService:
        """Load the model in `model_dir` as the settings say, and serve it.

        The manager decodes images under the settings' limits, the ones the service checks and
        advertises; the model id is the one the configuration names (`served_model_id`).
        """
        from ..resources.loader import served_model_id

        manager = FastVLMModelManager.from_settings(settings, model_dir)
        service = cls(manager, settings, owns_manager=True, model_id=served_model_id(settings, model_dir))
        # Structured output's view of the tokenizer takes about a second for FastVLM's 150k
        # tokens: built now, beside the first requests, not on the first constrained one.
        threading.Thread(
            target=_build_grammar_tokenizer, args=(service.engine,), name="lumen-grammars", daemon=True
        ).start()
        return service

    @classmethod
    def from_config(cls, service_config: Any, cache_dir: str | Path) -> FastVLMService:
        """For the Lumen hub: validate the config, resolve (download) the model, load it.

        Returns a servicer ready to serve; the hub never calls anything else first.
        """
        # Imported here: the resources layer (and its download dependencies) is only needed
        # when the service builds its own model.
        from ..resources.config import settings_from_service_config
        from ..resources.loader import resolve_model

        settings = settings_from_service_config(service_config, cache_dir)
        FastVLMModelManager.check_device(settings)  # a ConfigError naming the key, before any download
        model_dir = resolve_model(settings)
        return cls.from_settings(settings, model_dir)

    def _build_registry(self) -> TaskRegistry:
        registry = TaskRegistry()
        # Describe or answer about an image (or text only); one final JSON result.
        registry.register(
            TaskSpec(
                name=VLM_GENERATE,
                handler=partial(self._generate, streaming=False),
                input_mimes=IMAGE_MIMES,
                output_mimes=(JSON_MIME,),
            )
        )
        # As vlm_generate, streaming text deltas before the final JSON result.
        registry.register(
            TaskSpec(
                name=VLM_GENERATE_STREAM,
                handler=partial(self._generate, streaming=True),
                input_mimes=IMAGE_MIMES,
                output_mimes=(JSON_MIME, TEXT_MIME),
            )
        )
        return registry

    # ------------------------------------------------------------------ lifecycle

    def get_supported_tasks(self) -> list[str]:
        return self._registry.names()

    @property
    def in_flight(self) -> int:
        """Generations holding a batch slot right now."""
        return self.engine.active

    @property
    def queued(self) -> int:
        return self.engine.waiting

    def begin_shutdown(self) -> None:
        """New requests (and those waiting for a slot) get UNAVAILABLE; running ones go on."""
        self.engine.begin_shutdown()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no generation runs or waits; False if `timeout` passed first."""
        return self.engine.wait_idle(timeout)

    def cancel_all(self) -> None:
        """Stop every running generation at its next step; each is answered UNAVAILABLE."""
        self.engine.cancel_all()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new requests, stop running ones, and release the model if we loaded it.

        The server should let in-flight generations finish first (`begin_shutdown`, then
        `wait_idle` for the grace period); whatever still runs is cancelled here and gets
        `timeout` seconds to reach its next step before the model is closed under it.
        """
        if self._closed:
            return
        self._closed = True
        if self._owns_engine:
            self.engine.close(timeout)
        else:
            self.begin_shutdown()
        if self._owns_manager:
            self.manager.close()

    # ------------------------------------------------------------------ rpc: Infer

    def Infer(self, request_iterator: Iterable[Any], context: Any) -> Iterator[ml_service_pb2.InferResponse]:
        """Answer every request of the stream, in order; chunked payloads are reassembled.

        This is the synchronous servicer the Lumen hub hosts on its own grpc server; our own
        server's front door (`transports.grpc_aio`) reads streams itself and calls `respond`.
        """
        assembler = ChunkAssembler(self.settings.limits.max_payload_bytes, budget=self.uploads)
        terminated = watch_termination(context)
        try:
            for request in _requests_until_gone(request_iterator):
                yield from respond(request, assembler, CallControl(context, terminated), self.answer)
        finally:
            # However the stream ends (client gone, server stopping too), its uploads are freed;
            # those of a stream that ended normally are answered below.
            abandoned = assembler.abandon()
        yield from abandoned_responses(abandoned)

    @property
    def shutting_down(self) -> bool:
        return self.engine.closed

    def answer(self, request: CompleteRequest, control: CallControl) -> Iterator[ml_service_pb2.InferResponse]:
        """Route one complete request to its task; every failure becomes one final error response.

        Lazy: each `next()` waits for the request's next engine event.
        """
        started = time.perf_counter()
        failure: ml_service_pb2.InferResponse | None = None
        tracker = self.metrics.track("grpc", request.task if request.task in self._registry.names() else "unknown")
        try:
            if self.engine.closed:
                raise Unavailable("the server is shutting down")
            task = self._registry.get(request.task)
            yield from task.handler(request, control, started, tracker)
        except (ClientGone, GeneratorExit) as exc:
            tracker.failed(exc)
            # ClientGone: the engine saw the cancel. GeneratorExit: the transport stopped drawing
            # responses (the call ended between two of them) and closed us.
            log.info(
                "correlation_id=%s task=%s cancelled by the client",
                shown_id(request.correlation_id),
                shown(request.task),
            )
            if isinstance(exc, GeneratorExit):
                raise
        except Exception as exc:
            tracker.failed(exc)
            # Yielded after the except block: the exception's traceback would otherwise keep
            # the abandoned generation's frames (and KV cache) alive while the client reads.
            failure = self._failure(request, exc, started)
        if failure is not None:
            yield failure

    def _failure(self, request: CompleteRequest, exc: Exception, started: float) -> ml_service_pb2.InferResponse:
        lat_ms = (time.perf_counter() - started) * 1000.0
        if error_code_for(exc) == ErrorCode.ERROR_CODE_INTERNAL:
            log.exception(
                "correlation_id=%s task=%s failed with an internal error",
                shown_id(request.correlation_id),
                shown(request.task),
            )
        else:
            _log_refusal(request.correlation_id, request.task, exc)
        return error_response(request.correlation_id, exc, lat_ms)

    # ------------------------------------------------------------------ the generation tasks

    def _generate(
        self,
        request: CompleteRequest,
        control: CallControl,
        started: float,
        tracker: RequestTracker,
        *,
        streaming: bool,
    ) -> Iterator[ml_service_pb2.InferResponse]:
        generation = build_generation_request(request, self.settings.limits)  # before admission: cheap
        log.debug(
            "correlation_id=%s messages=%s",
            shown_id(request.correlation_id),
            shown(json.dumps(generation.messages, ensure_ascii=False), SHOWN_TEXT_CHARS),
        )
        control.check()
        handle = self.engine.submit(generation, control.deadline())
        # A client gone stops its generation within a step: at once where the context calls back,
        # else when the wait for the next event next asks whether the call is active.
        unregister = control.on_end(handle.cancel)
        chunks = 0
        result: GenerationResult | None = None
        try:
            for event in handle.watch(control.is_active):
                if isinstance(event, TextDelta):
                    tracker.delta(event)
                    if streaming:
                        yield partial_response(request.correlation_id, event, chunks)
                        chunks += 1
                else:
                    result = event
        finally:
            unregister()
            handle.cancel()  # nothing more is read: a generation still running stops (a no-op once done)
        if result is None:  # pragma: no cover - a handle ends with a result or raises
            raise RuntimeError("generation ended without a result")
        queued_ms = (handle.submitted - started) * 1000.0
        tracker.finished(result)
        yield self._final_response(request, generation, result, started, queued_ms, chunks if streaming else None)

    def _final_response(
        self,
        request: CompleteRequest,
        generation: GenerationRequest,
        result: GenerationResult,
        started: float,
        before_submit_ms: float,
        streaming_chunks: int | None,
    ) -> ml_service_pb2.InferResponse:
        lat_ms = (time.perf_counter() - started) * 1000.0
        # The engine's ttft counts from submission (its queue included); the request's from here.
        ttft_ms = before_submit_ms + result.ttft_ms
        body = result_json(result, generation, self.model_id, streaming_chunks)
        log.info(
            "correlation_id=%s task=%s input_tokens=%d generated_tokens=%d finish_reason=%s ttft_ms=%.1f lat_ms=%.1f",
            shown_id(request.correlation_id),
            shown(request.task),
            result.input_tokens,
            result.generated_tokens,
            result.finish_reason.value,
            ttft_ms,
            lat_ms,
        )
        meta = {
            "lat_ms": f"{lat_ms:.1f}",
            "ttft_ms": f"{ttft_ms:.1f}",
            "input_tokens": str(result.input_tokens),
            "image_tokens": str(result.image_tokens),
            "generated_tokens": str(result.generated_tokens),
            "finish_reason": result.finish_reason.value,
        }
        if result.response_format is not None:  # the constraint the answer was generated under
            meta["response_format"] = result.response_format
        return ml_service_pb2.InferResponse(
            correlation_id=request.correlation_id,
            is_final=True,
            result=body,
            result_mime=JSON_MIME,
            result_schema=RESULT_SCHEMA,
            seq=streaming_chunks or 0,  # a stream's final continues its partials' count
            meta=meta,
        )

    # ------------------------------------------------------------------ rpc: capabilities, health

    def GetCapabilities(self, request: Any, context: Any) -> ml_service_pb2.Capability:
        return self.capability()

    def StreamCapabilities(self, request: Any, context: Any) -> Iterator[ml_service_pb2.Capability]:
        """The current capability, once: a loaded model's capability never changes."""
        yield self.capability()

    def Health(self, request: Any, context: Any) -> empty_pb2.Empty:
        """Empty while serving; UNAVAILABLE once shutdown began."""
        if self.engine.closed:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return empty_pb2.Empty()

    def capability(self) -> ml_service_pb2.Capability:
        if self._capability is None:
            self._capability = self._build_capability()
        return self._capability

    def enforced_limits(self) -> dict[str, int]:
        """The limits this service enforces, as reported in every task's capability.

        All but the context length come from the settings, as the request checks' do;
        `from_settings` builds the manager's decoder limits from the same settings.
        """
        limits = self.settings.limits
        return {
            "max_payload_bytes": limits.max_payload_bytes,
            "max_image_pixels": limits.max_image_pixels,
            "max_new_tokens": limits.max_new_tokens,
            "default_max_new_tokens": limits.request_default_max_new_tokens,
            "context_length": self.manager.describe().context_length,
            "max_concurrency": self.engine.max_concurrency,
            "max_queue": self.engine.max_queue,
            "kv_cache_tokens": self.settings.admission.kv_cache_tokens,
            "kv_slot_tokens": self.engine.slot_tokens,
            "max_stop_sequences": limits.max_stop_sequences,
            "max_stop_sequence_chars": limits.max_stop_sequence_chars,
            "max_messages_chars": limits.max_messages_chars,
            "max_response_format_chars": limits.max_response_format_chars,
            "max_correlation_id_bytes": MAX_CORRELATION_ID_BYTES,
        }

    def _build_capability(self) -> ml_service_pb2.Capability:
        model = self.manager.describe()  # the model's own description; nothing reached through it
        extra = {
            "version": __version__,
            "model_name": self.settings.model.model,
            "providers": ",".join(model.providers),
            "image_size": model.image_size,
            "image_tokens": model.image_tokens,
            "context_length": model.context_length,
            "load_time_ms": f"{model.load_time_ms:.1f}",
            "resize_mode": model.resize_mode.value,
            "response_formats": ",".join(RESPONSE_FORMAT_KINDS),
        }
        return self._registry.capability(
            service_name=self.settings.service_name,
            model_ids=[self.model_id],
            runtime=model.runtime,
            max_concurrency=self.engine.max_concurrency,
            precisions=model.precisions,  # every precision loaded, the decoder's first
            extra={key: value for key, value in extra.items() if value is not None},  # unknown: left out
            limits=self.enforced_limits(),
        )


GeneralFastVLMService = FastVLMService

Answer = Callable[[CompleteRequest, CallControl], Iterator[ml_service_pb2.InferResponse]]


def respond(
    request: Any,
    assembler: ChunkAssembler,
    control: CallControl,
    answer: Answer,
    correlation_id: str = "",
) -> Iterator[ml_service_pb2.InferResponse]:
    """One message of a stream: into the stream's assembler, and a complete request to `answer`.

    A message that is a chunk of an unfinished upload gets no response; a refused one gets
    one final error. `correlation_id` names a message that has none (a fresh id by default);
    the message itself is left as it came, because the assembler must see that it had none
    (see `ChunkAssembler`). Shared by the synchronous servicer and our server's front door.
    """
    correlation_id = request.correlation_id or correlation_id or uuid.uuid4().hex
    try:
        check_correlation_id(request.correlation_id)  # first: every line about the request carries it
        complete = assembler.feed(request, correlation_id)
    except (InputError, UploadsBusy) as exc:
        _log_refusal(correlation_id, request.task, exc)
        yield error_response(correlation_id, exc)
        return
    if complete is not None:
        yield from answer(complete, control)


def abandoned_responses(abandoned: Iterable[tuple[str, Exception]]) -> Iterator[ml_service_pb2.InferResponse]:
    """The answers for uploads left unfinished (a stream ended, or an upload went silent)."""
    for correlation_id, exc in abandoned:
        _log_refusal(correlation_id, "", exc)
        yield error_response(correlation_id, exc)


def _build_grammar_tokenizer(engine: Engine) -> None:
    start = time.perf_counter()
    engine.grammars.grammar_tokenizer()
    log.info(
        "structured output ready: the grammar engine read the tokenizer in %.0f ms",
        1000 * (time.perf_counter() - start),
    )


def _requests_until_gone(request_iterator: Iterable[Any]) -> Iterator[Any]:
    """The stream's requests; ends quietly when the client cancels or disconnects mid-read."""
    try:
        yield from request_iterator
    except grpc.RpcError:
        log.debug("request stream ended by the client", exc_info=True)


def _abort(context: Any, code: grpc.StatusCode, details: str) -> None:
    """context.abort when the context has it (it raises), else set_code/set_details."""
    abort: Callable[..., Any] | None = getattr(context, "abort", None)
    if callable(abort):
        abort(code, details)
        return
    for name, value in (("set_code", code), ("set_details", details)):
        setter = getattr(context, name, None)
        if callable(setter):
            setter(value)
