"""End-to-end fixtures: the service on a real loopback gRPC server, over the tiny model.

The model is loaded once per session (the root conftest's `manager`); every server built here
is stopped in its fixture's teardown. Tests that need a generation to last (admission,
cancellation, deadlines) wrap the real manager in `ThrottledManager`, which slows each decode
step down or holds it until released, instead of relying on how fast this machine is.
"""

from __future__ import annotations

import atexit
import json
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from lumen_vlm.fastvlm.fastvlm_service import FastVLMService
from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc
from lumen_vlm.resources.settings import AdmissionSettings, GenerationLimits, ModelSettings, VLMSettings
from lumen_vlm.server import server_max_concurrent_rpcs, server_options, server_thread_pool_size

from ..conftest import GOLDEN

MIB = 1024 * 1024
CALL_TIMEOUT = 60.0  # generous: the machine may be slow and noisy
MESSAGE_LIMIT = 32 * MIB
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
]
# What the protocol names the two result types (written out: the tests check the wire).
JSON_MIME = "application/json;schema=text_generation_v1"
TEXT_MIME = "text/plain;charset=utf-8"
# Settings' cache (saved ORT graphs, node uuid) goes to a temporary directory, never the source tree.
CACHE_DIR = Path(tempfile.mkdtemp(prefix="lumen-vlm-test-cache-"))
atexit.register(shutil.rmtree, CACHE_DIR, True)
QUESTION = "What do you see in this image?"


def make_settings(model_dir: Path, **overrides: Any) -> VLMSettings:
    """Test settings: 3 MiB payloads, a small queue; keyword overrides for admission/limits fields."""
    admission = AdmissionSettings(max_concurrency=2, max_queue=4, queue_timeout_s=30.0, shutdown_grace_s=5.0)
    limits = GenerationLimits(max_payload_bytes=3 * MIB)
    admission = replace(admission, **{k: v for k, v in overrides.items() if hasattr(admission, k)})
    limits = replace(limits, **{k: v for k, v in overrides.items() if hasattr(limits, k)})
    return VLMSettings(
        cache_dir=CACHE_DIR,
        model=ModelSettings(alias="fastvlm", model=str(model_dir)),
        limits=limits,
        admission=admission,
        service_name="lumen-vlm",
    )


@dataclass
class Served:
    """A running server with its service and a client stub."""

    service: FastVLMService
    server: grpc.Server
    channel: grpc.Channel
    stub: ml_service_pb2_grpc.InferenceStub
    port: int

    def stop(self) -> None:
        self.service.begin_shutdown()
        self.service.cancel_all()
        self.channel.close()
        self.server.stop(grace=2).wait(timeout=30)


def serve(service: FastVLMService) -> Served:
    settings = service.settings
    server = grpc.server(
        ThreadPoolExecutor(max_workers=server_thread_pool_size(service)),
        options=server_options(settings),
        maximum_concurrent_rpcs=server_max_concurrent_rpcs(service),
    )
    ml_service_pb2_grpc.add_InferenceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
    return Served(service, server, channel, ml_service_pb2_grpc.InferenceStub(channel), port)


@pytest.fixture(scope="module")
def served(manager: Any, tiny_model_dir: Path) -> Iterator[Served]:
    """One shared server with the default test settings."""
    handle = serve(FastVLMService(manager, make_settings(tiny_model_dir)))
    yield handle
    handle.stop()


@pytest.fixture
def start_server(manager: Any, tiny_model_dir: Path) -> Iterator[Callable[..., Served]]:
    """A factory for servers with their own settings (and manager); all stopped at teardown."""
    handles: list[Served] = []

    def start(model: Any = None, **overrides: Any) -> Served:
        handle = serve(FastVLMService(model or manager, make_settings(tiny_model_dir, **overrides)))
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


# --------------------------------------------------------------------------- a slowed-down model


class ThrottledManager:
    """The real model manager, with a pause before every batched decode step.

    The engine runs each sequence's prefill, then samples and sends a token for every
    sequence and runs one batched decode step for the next; this wrapper pauses `step_s`
    before each decode step, so the tokens already sampled have been sent (a large pause
    holds the engine there until `release()`, after which it runs at full speed). `running`
    counts sequences in the batch, `events` the tokens produced, and `finished` the tokens
    of each sequence that left the batch, so a test can see that a generation really
    stopped, and where.
    """

    def __init__(self, manager: Any, step_s: float) -> None:
        self._manager = manager
        self.step_s = step_s
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.running = 0
        self.events = 0
        self.finished: list[int] = []  # tokens produced by each sequence that left the batch
        self.first_event = threading.Event()
        self._tokens: dict[int, int] = {}  # slot -> tokens of the sequence in it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def release(self) -> None:
        self._released.set()

    def prefill(self, prepared: Any, cache: Any, slot: int, chunk_tokens: int) -> Iterator[Any]:
        with self._lock:
            self.running += 1
            self._tokens[slot] = 0
        try:
            for logits in self._manager.prefill(prepared, cache, slot, chunk_tokens):
                if logits is not None:
                    self._count([slot])
                yield logits
        finally:  # the engine closes the prefill when the sequence leaves the batch
            with self._lock:
                self.running -= 1
                self.finished.append(self._tokens.pop(slot))

    def decode(self, cache: Any, slots: Any, tokens: Any) -> Any:
        self.first_event.set()
        self._released.wait(self.step_s)
        logits = self._manager.decode(cache, slots, tokens)
        self._count(slots)
        return logits

    def _count(self, slots: Any) -> None:
        with self._lock:
            self.events += len(slots)
            for slot in slots:
                self._tokens[slot] += 1


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Poll `condition` until it holds or `timeout` passes: a bound, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# --------------------------------------------------------------------------- requests


def image_bytes(name: str = "landscape.png") -> bytes:
    return (GOLDEN / name).read_bytes()


def make_request(
    task: str = "vlm_generate",
    *,
    image: bytes | None = None,
    mime: str | None = None,
    correlation_id: str = "",
    messages: Any = None,
    **meta: Any,
) -> ml_service_pb2.InferRequest:
    """An InferRequest; meta values are turned into strings, `messages` into JSON."""
    assert "meta" not in meta, "meta keys are keyword arguments of their own"
    wire_meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in meta.items()}
    if messages is not None:
        wire_meta["messages"] = messages if isinstance(messages, str) else json.dumps(messages)
    elif "prompt" not in wire_meta:
        wire_meta["messages"] = json.dumps([{"role": "user", "content": QUESTION}])
    return ml_service_pb2.InferRequest(
        correlation_id=correlation_id,
        task=task,
        payload=image or b"",
        payload_mime=mime if mime is not None else ("image/png" if image else ""),
        meta=wire_meta,
    )


LONG = "400"  # tokens; the tiny model's context is 1024


def long_stream(correlation_id: str = "long") -> ml_service_pb2.InferRequest:
    return make_request("vlm_generate_stream", image=image_bytes(), correlation_id=correlation_id, max_new_tokens=LONG)


def good_request(correlation_id: str = "good") -> ml_service_pb2.InferRequest:
    return make_request(image=image_bytes(), correlation_id=correlation_id, max_new_tokens="4")


def infer(
    served: Served, requests: Iterable[ml_service_pb2.InferRequest], timeout: float = CALL_TIMEOUT
) -> list[ml_service_pb2.InferResponse]:
    return list(served.stub.Infer(iter(list(requests)), timeout=timeout))


def finals(responses: Iterable[ml_service_pb2.InferResponse]) -> dict[str, ml_service_pb2.InferResponse]:
    """The final response of each correlation id (each must have exactly one)."""
    result: dict[str, ml_service_pb2.InferResponse] = {}
    for response in responses:
        if response.is_final:
            assert response.correlation_id not in result, f"two final responses for {response.correlation_id}"
            result[response.correlation_id] = response
    return result


def result_of(response: ml_service_pb2.InferResponse) -> dict[str, Any]:
    assert response.is_final
    assert not response.HasField("error"), response.error
    return json.loads(response.result)


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height`: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
