"""The server's asyncio front door under careless and hostile clients (in process, over loopback).

Each test builds a `VLMServer` (the one `lumen-vlm` runs) with small limits, over the tiny model
or a throttled one, and checks one promise of `transports.grpc_aio`. The process-level versions
(a real `lumen-vlm`, signals, RSS) are in tests/reliability.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lumen_vlm.fastvlm.fastvlm_service import FastVLMService
from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc
from lumen_vlm.resources.settings import ServerSettings
from lumen_vlm.server import VLMServer

from ..service.conftest import (
    MIB,
    ThrottledManager,
    good_request,
    image_bytes,
    long_stream,
    make_request,
    make_settings,
    result_of,
    wait_until,
)

ErrorCode = ml_service_pb2.ErrorCode
HEALTH_TIMEOUT_S = 2.0  # health must answer at once; the bound only keeps a failing test short


class Stream:
    """An Infer stream fed by hand: `send` requests, `next` responses."""

    def __init__(self, stub: Any, timeout: float = 60.0) -> None:
        self._outbox: queue.Queue[Any] = queue.Queue()
        self.call = stub.Infer(iter(self._outbox.get, None), timeout=timeout)

    def send(self, request: Any) -> None:
        self._outbox.put(request)

    def next(self) -> ml_service_pb2.InferResponse:
        return next(self.call)

    def close(self) -> None:
        self._outbox.put(None)


@pytest.fixture
def start(manager: Any, tiny_model_dir: Path) -> Iterator[Callable[..., tuple[VLMServer, grpc.Channel]]]:
    """Start a ready VLMServer with settings overrides (and optionally another manager)."""
    started: list[tuple[VLMServer, grpc.Channel]] = []

    def start_server(model: Any = None, **overrides: Any) -> tuple[VLMServer, grpc.Channel]:
        settings = replace(make_settings(tiny_model_dir, **overrides), server=ServerSettings(host="127.0.0.1", port=0))
        server = VLMServer(settings)
        server.start()
        server.install(FastVLMService(model or manager, settings))
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        started.append((server, channel))
        return server, channel

    yield start_server
    for server, channel in started:
        channel.close()
        server.shutdown()


def stub_of(channel: grpc.Channel) -> ml_service_pb2_grpc.InferenceStub:
    return ml_service_pb2_grpc.InferenceStub(channel)


def assert_healthy(channel: grpc.Channel) -> None:
    stub_of(channel).Health(empty_pb2.Empty(), timeout=HEALTH_TIMEOUT_S)
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- idle streams


def test_idle_streams_never_silence_health_and_the_ones_past_max_streams_are_refused(start: Any) -> None:
    # On the synchronous server, max_concurrency + max_queue + 32 idle streams took every
    # worker: health then failed with RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!".
    # Which 8 of the 40 streams reach the server first is not the order they were opened in.
    server, channel = start(max_streams=8)
    idle = [Stream(stub_of(channel)) for _ in range(8 + 32)]
    try:
        for _ in range(3):
            assert_healthy(channel)
        assert wait_until(lambda: sum(stream.call.done() for stream in idle) >= 32, timeout=10)
        time.sleep(0.3)  # none more
        refused = [stream for stream in idle if stream.call.done()]
        assert len(refused) == 32
        for stream in refused:
            assert stream.call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams" in stream.call.details()
        assert_healthy(channel)
        # A stream that leaves gives its place to a new one, which is served.
        leaving = next(stream for stream in idle if not stream.call.done())
        leaving.close()
        with pytest.raises(StopIteration):
            leaving.next()
        assert wait_until(lambda: server.inference._open_streams < 8, timeout=10)
        fresh = Stream(stub_of(channel))
        fresh.send(good_request("fresh"))
        assert result_of(fresh.next())["generated_tokens"] >= 1
        fresh.close()
    finally:
        for stream in idle:
            stream.close()


def test_an_idle_stream_is_ended_unavailable_after_stream_idle_timeout_s(start: Any) -> None:
    _, channel = start(stream_idle_timeout_s=0.5)
    stream = Stream(stub_of(channel))
    stream.send(good_request("first"))
    assert result_of(stream.next())["generated_tokens"] >= 1  # the timer counts from here
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stream.next()
    waited = time.monotonic() - began
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "idle" in info.value.details() and "stream_idle_timeout_s" in info.value.details()
    assert 0.4 <= waited < 10.0
    stream.close()


def test_a_long_generation_is_not_cut_by_the_idle_timeout(start: Any, manager: Any) -> None:
    throttled = ThrottledManager(manager, step_s=0.02)
    _, channel = start(model=throttled, stream_idle_timeout_s=0.3)
    stream = Stream(stub_of(channel))
    stream.send(make_request(image=image_bytes(), correlation_id="long", max_new_tokens="60"))
    began = time.monotonic()
    final = stream.next()
    assert time.monotonic() - began > 0.3, "the generation outlasted the idle timeout"
    assert result_of(final)["generated_tokens"] >= 1
    stream.close()


# --------------------------------------------------------------------------- chunked uploads


def chunk(correlation_id: str, seq: int, total: int, data: bytes, offset: int) -> ml_service_pb2.InferRequest:
    request = make_request(correlation_id=correlation_id, max_new_tokens="4")
    request.payload, request.payload_mime = data, "image/png"
    request.seq, request.total, request.offset = seq, total, offset
    return request


def test_a_silent_upload_is_dropped_deadline_exceeded_and_the_stream_goes_on(start: Any) -> None:
    server, channel = start(upload_idle_timeout_s=0.5)
    image = image_bytes()
    stream = Stream(stub_of(channel))
    first = chunk("squat", 0, 3, image[:1000], 0)
    stream.send(first)
    held = 1000 + meta_size(first)
    assert wait_until(lambda: server.inference.uploads.used == held, timeout=10)
    dropped = stream.next()
    assert dropped.correlation_id == "squat" and dropped.is_final
    assert dropped.error.code == ErrorCode.ERROR_CODE_DEADLINE_EXCEEDED
    assert "upload_idle_timeout_s" in dropped.error.message
    assert server.inference.uploads.used == 0, "its bytes went back to the budget"
    stream.send(chunk("squat", 1, 3, image[1000:2000], 1000))  # a late chunk: dropped quietly
    stream.send(good_request("after"))
    after = stream.next()
    assert after.correlation_id == "after" and result_of(after)["generated_tokens"] >= 1
    stream.close()


def meta_size(request: ml_service_pb2.InferRequest) -> int:
    """What the upload budget counts for a request's meta: its characters."""
    return sum(len(key) + len(value) for key, value in request.meta.items())


def test_one_stream_cannot_take_the_whole_upload_budget(start: Any) -> None:
    # 3 MiB payloads: the budget is 4 x 3 MiB, one stream's share 3 MiB and its meta (1 MiB).
    server, channel = start()
    part = b"\x89PNG\r\n\x1a\n" + b"x" * (int(2.5 * MIB) - 8)
    greedy = Stream(stub_of(channel))
    first, second = chunk("a", 0, 2, part, 0), chunk("b", 0, 2, part, 0)
    greedy.send(first)
    greedy.send(second)
    refused = greedy.next()
    assert refused.correlation_id == "b"
    assert refused.error.code == ErrorCode.ERROR_CODE_UNAVAILABLE
    assert "one stream may" in refused.error.message
    held = len(part) + meta_size(first)
    assert server.inference.uploads.used == held
    other = Stream(stub_of(channel))  # another client still has room
    other.send(chunk("c", 0, 2, part, 0))
    assert wait_until(lambda: server.inference.uploads.used == 2 * held, timeout=10)
    greedy.close()
    other.close()


class CountingPool(ThreadPoolExecutor):
    """A thread pool that counts what was submitted to it."""

    def __init__(self, workers: int) -> None:
        super().__init__(max_workers=workers)
        self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(*args, **kwargs)


def test_a_chunk_read_before_its_client_cancelled_holds_no_budget_after(start: Any) -> None:
    # The chunk is fed in the pool; when the pool is busy the client may cancel first, and
    # the stream's uploads are abandoned before the chunk is fed. Its bytes then stayed
    # reserved for good: a few such cancels and every chunked upload was refused.
    server, channel = start()
    pool = CountingPool(1)
    server.inference._executor = pool
    gate = threading.Event()
    pool.submit(gate.wait, 30)  # the pool's one thread is busy
    try:
        stream = Stream(stub_of(channel))
        stream.send(chunk("late", 0, 2, image_bytes()[:1000], 0))
        assert wait_until(lambda: pool.submitted == 2, timeout=10), "the chunk waits for the pool"
        stream.call.cancel()
        assert wait_until(lambda: server.inference._open_streams == 0, timeout=10), "the stream is gone"
    finally:
        gate.set()
    pool.submit(lambda: None).result(timeout=10)  # the chunk has been fed by now
    assert server.inference.uploads.used == 0


# --------------------------------------------------------------------------- malformed messages


def raw_stream(channel: grpc.Channel, messages: list[bytes]) -> list[ml_service_pb2.InferResponse]:
    call = channel.stream_stream(
        "/home_native.v1.Inference/Infer",
        request_serializer=lambda data: data,
        response_deserializer=ml_service_pb2.InferResponse.FromString,
    )
    return list(call(iter(messages), timeout=60))


def test_non_utf8_text_is_answered_invalid_argument_and_the_stream_goes_on(start: Any) -> None:
    # grpc's own deserializer ended the whole stream with INTERNAL "Exception deserializing request!".
    _, channel = start()
    bad = make_request(correlation_id="bad", prompt="PLACEHOLDER").SerializeToString()
    bad = bad.replace(b"PLACEHOLDER", b"\xff\xfe not text")
    responses = raw_stream(channel, [bad, good_request("good").SerializeToString()])
    assert [r.correlation_id for r in responses] == ["bad", "good"]
    assert responses[0].error.code == ErrorCode.ERROR_CODE_INVALID_ARGUMENT
    assert "meta['prompt']" in responses[0].error.message and "UTF-8" in responses[0].error.message
    assert result_of(responses[1])["generated_tokens"] >= 1


def test_a_message_that_is_not_protobuf_is_answered_and_the_stream_goes_on(start: Any) -> None:
    _, channel = start()
    responses = raw_stream(channel, [b"\xff\xff\xff\xff", good_request("good").SerializeToString()])
    assert responses[0].error.code == ErrorCode.ERROR_CODE_INVALID_ARGUMENT
    assert "not a valid InferRequest" in responses[0].error.message
    assert responses[1].correlation_id == "good" and result_of(responses[1])["generated_tokens"] >= 1


def test_a_chunk_that_cannot_be_read_fails_its_upload_once(start: Any) -> None:
    _, channel = start()
    image = image_bytes()
    first = chunk("up", 0, 2, image[:100], 0).SerializeToString()
    second = chunk("up", 1, 2, image[100:], 100)
    second.meta["prompt"] = "PLACEHOLDER"
    broken = second.SerializeToString().replace(b"PLACEHOLDER", b"\xc3\x28xxxxxxxxx")
    responses = raw_stream(channel, [first, broken, good_request("next").SerializeToString()])
    assert [r.correlation_id for r in responses] == ["up", "next"], "one answer for the upload"
    assert responses[0].error.code == ErrorCode.ERROR_CODE_INVALID_ARGUMENT


# --------------------------------------------------------------------------- streams that start mid-way


@pytest.mark.parametrize(("seq", "total"), [(1, 1), (1, 9), (3, 0)])
def test_a_first_message_with_seq_past_0_is_invalid_argument_not_still_loading(
    start: Any, seq: int, total: int
) -> None:
    _, channel = start()
    request = good_request("mid")
    request.seq, request.total = seq, total
    stream = Stream(stub_of(channel))
    stream.send(request)
    answer = stream.next()
    assert answer.error.code == ErrorCode.ERROR_CODE_INVALID_ARGUMENT, answer
    assert "seq" in answer.error.message
    stream.close()


# --------------------------------------------------------------------------- cancellation, shutdown


def test_a_cancelled_call_frees_its_slot_within_a_step_and_is_logged(
    start: Any, manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    throttled = ThrottledManager(manager, step_s=0.2)
    _, channel = start(model=throttled, max_concurrency=1, max_queue=0)
    stub = stub_of(channel)
    caplog.set_level(logging.INFO, logger="lumen_vlm")
    doomed = stub.Infer(iter([long_stream("doomed")]), timeout=60)
    next(doomed)  # its first delta: it holds the only slot
    doomed.cancel()
    assert wait_until(lambda: throttled.running == 0, timeout=5.0), "stopped within a step or two"
    follower = stub.Infer(iter([good_request("follower")]), timeout=60)
    assert result_of(next(follower))["generated_tokens"] >= 1, "the slot was free again"
    assert wait_until(lambda: any("doomed" in r.getMessage() and "cancelled" in r.getMessage() for r in caplog.records))


def test_shutdown_ends_within_the_grace_period_and_answers_the_running_generation(
    manager: Any, tiny_model_dir: Path
) -> None:
    throttled = ThrottledManager(manager, step_s=0.5)
    settings = replace(
        make_settings(tiny_model_dir, shutdown_grace_s=1.0), server=ServerSettings(host="127.0.0.1", port=0)
    )
    server = VLMServer(settings)
    server.start()
    server.install(FastVLMService(throttled, settings))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        running = stub_of(channel).Infer(iter([long_stream("running")]), timeout=60)
        next(running)
        idle = Stream(stub_of(channel))  # an idle stream must not hold the shutdown up
        raw_stream(channel, [b"\xff\xff"])  # nor a message that could not be read
        began = time.monotonic()
        server.shutdown()
        took = time.monotonic() - began
        answers = [r for r in running if r.is_final]
        idle.close()
    assert took < settings.admission.shutdown_grace_s + 1.0, took
    assert len(answers) == 1 and answers[0].error.code == ErrorCode.ERROR_CODE_UNAVAILABLE


def test_shutdown_with_nothing_running_is_immediate(start: Any, manager: Any, tiny_model_dir: Path) -> None:
    settings = replace(
        make_settings(tiny_model_dir, shutdown_grace_s=5.0), server=ServerSettings(host="127.0.0.1", port=0)
    )
    server = VLMServer(settings)
    server.start()
    server.install(FastVLMService(manager, settings))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw_stream(channel, [b"\xff\xff"])
        idle = Stream(stub_of(channel))
        began = time.monotonic()
        server.shutdown()
        assert time.monotonic() - began < 2.0  # nothing to wait for: well under the 5 s grace
        idle.close()


def test_deltas_arrive_while_health_answers(start: Any, manager: Any) -> None:
    """The event loop never waits on the model: health answers between two decode steps."""
    throttled = ThrottledManager(manager, step_s=0.05)
    _, channel = start(model=throttled)
    call = stub_of(channel).Infer(iter([long_stream("s")]), timeout=60)
    texts = []
    for index, response in enumerate(call):
        if index in (1, 5, 10):
            assert_healthy(channel)
        if response.is_final:
            final = json.loads(response.result)
            break
        texts.append(response.result.decode())
    assert "".join(texts) == final["text"]


def test_an_upload_without_correlation_id_is_answered_once(start: Any) -> None:
    # The front door named every id-less message before the assembler saw it, so each chunk
    # looked like an upload of its own: chunk 0 was held until the upload timeout and every
    # later chunk got an "out of order" error of its own.
    server, channel = start()
    image = image_bytes()
    third = len(image) // 3
    parts = [chunk("", seq, 3, image[seq * third : (seq + 1) * third], seq * third) for seq in range(3)]
    responses = raw_stream(
        channel, [part.SerializeToString() for part in parts] + [good_request("after").SerializeToString()]
    )
    assert [r.correlation_id == "after" for r in responses] == [False, True], responses
    refused = responses[0]
    assert refused.error.code == ErrorCode.ERROR_CODE_INVALID_ARGUMENT and "correlation_id" in refused.error.message
    assert refused.correlation_id, "the answer carries an id the server made up"
    assert result_of(responses[1])["generated_tokens"] >= 1
    assert server.inference.uploads.used == 0


def test_a_message_that_cannot_be_read_with_an_overlong_id_is_answered_and_the_stream_goes_on(start: Any) -> None:
    # Its id was echoed escaped, four characters for each byte that is not UTF-8: past the
    # largest message the server may send, which ended the stream; and the id was kept to
    # drop the rest of its "upload" (up to 16 such ids per stream, each as large as a message).
    _, channel = start(max_payload_bytes=MIB)
    bad = make_request(correlation_id="PLACEHOLDER")
    bad.seq, bad.total = 0, 2
    bad = bad.SerializeToString().replace(b"\n\x0bPLACEHOLDER", b"\n" + _varint(MIB) + b"\xff" * MIB)
    assert len(bad) > MIB
    responses = raw_stream(channel, [bad, good_request("after").SerializeToString()])
    assert [r.correlation_id for r in responses] == ["", "after"]
    assert responses[0].error.code == ErrorCode.ERROR_CODE_INVALID_ARGUMENT
    assert "correlation_id" in responses[0].error.message and "256" in responses[0].error.message
    assert result_of(responses[1])["generated_tokens"] >= 1


def _varint(value: int) -> bytes:
    """A protobuf length prefix."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def test_a_second_shutdown_or_close_does_nothing(manager: Any, tiny_model_dir: Path) -> None:
    settings = replace(make_settings(tiny_model_dir), server=ServerSettings(host="127.0.0.1", port=0))
    server = VLMServer(settings)
    server.start()
    server.install(FastVLMService(manager, settings))
    assert server.shutdown()
    began = time.monotonic()
    assert server.shutdown()
    server.close()
    assert time.monotonic() - began < 1.0, "nothing was waited for"
