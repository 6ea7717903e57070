"""The reliability suite's server: a real `lumen-vlm` process on a free loopback port.

Every test here meets the server as a client (or an attacker) would: over a real connection,
with the real process's limits, timers, signals and log. Servers come from `start_server`
(one per test) or from a module-scoped fixture built with `running_server` where several
tests can share one. `step_s` slows every decode step (tests/server/slow_decoding_server.py)
so that a generation stays in flight for as long as a test needs.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc

from ..conftest import GOLDEN
from ..server.test_server_process import ServerProcess, free_port, slow_decoding_server, write_config

INFER_METHOD = "/home_native.v1.Inference/Infer"
ErrorCode = ml_service_pb2.ErrorCode
IMAGE = (GOLDEN / "landscape.png").read_bytes()
QUESTION = "What do you see in this image?"
CALL_TIMEOUT_S = 60.0  # generous: a bound against hangs on a slow, shared machine
MIB = 1024 * 1024


@dataclass
class Server:
    """A running server process and how to reach it."""

    process: ServerProcess
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.process.lines)

    def channel(self, *options: tuple[str, Any]) -> grpc.Channel:
        """A new channel (a new connection), connected before it is returned."""
        channel = grpc.insecure_channel(self.address, options=list(options))
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
        return channel

    def rss_bytes(self) -> int:
        """The process's resident memory now, from /proc."""
        for line in Path(f"/proc/{self.process.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")


@contextmanager
def running_server(directory: Path, step_s: float | None = None, **vlm_settings: object) -> Iterator[Server]:
    """`lumen-vlm --config CFG` with `vlm_settings`, once it listens; killed at the end if still running.

    With `step_s`, every decode step of the model sleeps that long first.
    """
    port = free_port()
    config = write_config(directory / "config.yaml", port, **vlm_settings)
    if step_s is None:
        command = [sys.executable, "-m", "lumen_vlm", "--config", str(config)]
        env = None
    else:
        command, env = slow_decoding_server(config), {"SLOW_DECODE_STEP_S": str(step_s)}
    process = ServerProcess(command, env=env)
    try:
        process.wait_for(f"listening on 127.0.0.1:{port}")
        yield Server(process, port)
    finally:
        process.kill()


@pytest.fixture()
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """A factory: `start_server(step_s=..., **vlm_settings)`; every server is killed at teardown."""
    servers: list[Any] = []

    def start(step_s: float | None = None, **vlm_settings: object) -> Server:
        directory = tmp_path / f"server-{len(servers)}"
        directory.mkdir()
        context = running_server(directory, step_s, **vlm_settings)
        servers.append(context)
        return context.__enter__()

    yield start
    for context in reversed(servers):
        context.__exit__(None, None, None)


# --------------------------------------------------------------------------- requests


def request(
    task: str = "vlm_generate",
    correlation_id: str = "",
    *,
    image: bytes | None = IMAGE,
    prompt: str = QUESTION,
    max_new_tokens: int = 4,
    **meta: str,
) -> ml_service_pb2.InferRequest:
    """One whole (unchunked) request; greedy unless `meta` says otherwise."""
    return ml_service_pb2.InferRequest(
        correlation_id=correlation_id,
        task=task,
        payload=image or b"",
        payload_mime="image/png" if image else "",
        meta={
            "messages": json.dumps([{"role": "user", "content": prompt}]),
            "max_new_tokens": str(max_new_tokens),
            **meta,
        },
    )


def chunks(whole: ml_service_pb2.InferRequest, total: int) -> list[ml_service_pb2.InferRequest]:
    """`whole`'s payload as `total` chunks, as the Go SDK sends a large one."""
    payload = whole.payload
    size = -(-len(payload) // total)
    parts = []
    for seq in range(total):
        part = ml_service_pb2.InferRequest()
        part.CopyFrom(whole)
        part.payload, part.seq, part.total, part.offset = payload[seq * size : (seq + 1) * size], seq, total, seq * size
        parts.append(part)
    return parts


def with_raw_bytes(message: ml_service_pb2.InferRequest, placeholder: str, raw: bytes) -> bytes:
    """`message` on the wire with `placeholder`'s bytes replaced by `raw` (as long): how a client
    with no UTF-8 check, or an attacker, can send invalid UTF-8 in a string field."""
    wire = message.SerializeToString()
    assert len(raw) == len(placeholder.encode()) and wire.count(placeholder.encode()) == 1
    return wire.replace(placeholder.encode(), raw)


def result_of(response: ml_service_pb2.InferResponse) -> dict[str, Any]:
    assert response.is_final and not response.HasField("error"), response
    return json.loads(response.result)


# --------------------------------------------------------------------------- streams


_END = object()


class OpenStream:
    """An Infer stream the test writes to when it likes; a thread collects what comes back.

    Requests are messages or raw bytes (already serialized). `responses()` waits for answers;
    `ended()` waits for the call's end and gives its status code.
    """

    def __init__(self, channel: grpc.Channel, timeout: float | None = None) -> None:
        infer = channel.stream_stream(
            INFER_METHOD,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=ml_service_pb2.InferResponse.FromString,
        )
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self.opened = time.monotonic()
        self.ended_at: float | None = None
        self.finals_at: dict[str, float] = {}  # when each correlation_id's final answer arrived
        self.call = infer(iter(self._requests.get, _END), timeout=timeout)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                if response.is_final:
                    self.finals_at.setdefault(response.correlation_id, time.monotonic())
                self._responses.put(response)
        except grpc.RpcError:
            pass
        self.ended_at = time.monotonic()
        self._responses.put(_END)

    def send(self, *messages: ml_service_pb2.InferRequest | bytes) -> None:
        for message in messages:
            self._requests.put(message)

    def responses(self, count: int, timeout: float = CALL_TIMEOUT_S) -> list[ml_service_pb2.InferResponse]:
        """The next `count` responses; fails if the stream ends or `timeout` passes first."""
        received: list[ml_service_pb2.InferResponse] = []
        deadline = time.monotonic() + timeout
        while len(received) < count:
            try:
                item = self._responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{len(received)} of {count} responses within {timeout:g} s: {received}") from None
            if item is _END:
                raise AssertionError(f"the stream ended ({self.code()}) after {received}")
            received.append(item)
        return received

    def final(self, timeout: float = CALL_TIMEOUT_S) -> ml_service_pb2.InferResponse:
        """The next final response, skipping partials."""
        while True:
            (response,) = self.responses(1, timeout)
            if response.is_final:
                return response

    def until_end(self, timeout: float = CALL_TIMEOUT_S) -> list[ml_service_pb2.InferResponse]:
        """Every response still to come, up to the stream's end; fails if it has not ended by `timeout`."""
        received: list[ml_service_pb2.InferResponse] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the stream is still open after {timeout:g} s: {received}") from None
            if item is _END:
                return received
            received.append(item)

    def ended(self, timeout: float) -> bool:
        """Whether the call ended within `timeout`."""
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def code(self) -> grpc.StatusCode | None:
        return self.call.code() if self.ended_at is not None else None

    def details(self) -> str:
        return (self.call.details() or "") if self.ended_at is not None else ""

    def send_end(self) -> None:
        """No more requests: the client half-closes the stream."""
        self._requests.put(_END)

    def close(self) -> None:
        self.send_end()
        self.call.cancel()
        self._reader.join(10)


@contextmanager
def open_streams(channels: list[grpc.Channel], count: int) -> Iterator[list[OpenStream]]:
    """`count` Infer streams that send nothing, spread over `channels`; closed at the end."""
    streams: list[OpenStream] = []
    try:
        for index in range(count):
            streams.append(OpenStream(channels[index % len(channels)]))
        yield streams
    finally:
        for stream in streams:
            stream.close()


def health_answers(channel: grpc.Channel, timeout: float) -> None:
    """Inference.Health and grpc.health.v1 Check (both services) answer within `timeout` each."""
    ml_service_pb2_grpc.InferenceStub(channel).Health(empty_pb2.Empty(), timeout=timeout)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "home_native.v1.Inference"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        assert status == health_pb2.HealthCheckResponse.SERVING
