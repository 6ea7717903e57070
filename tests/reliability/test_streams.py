"""Open Infer streams: bounded by `max_streams`, ended when idle, never starving health checks.

Issue 9, defect 2: `max_concurrency + max_queue + 32` Infer streams that send nothing made every
RPC, health included, fail with RESOURCE_EXHAUSTED for as long as they stayed open.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from lumen_vlm.proto import ml_service_pb2_grpc

from ..service.conftest import wait_until
from .conftest import (
    OpenStream,
    Server,
    health_answers,
    open_streams,
    request,
    result_of,
    running_server,
)

MAX_STREAMS = 16
PAST_THE_LIMIT = 32  # streams opened beyond max_streams, as in the issue
HEALTH_TIMEOUT_S = 1.0  # a probe's budget: Kubernetes' default timeoutSeconds is 1
IDLE_TIMEOUT_S = 2.0
CHANNELS = 4  # the idle streams come over several connections, as from several clients


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """max_streams=16; a small admission (1 + 2) so that main's RPC limit (1 + 2 + 32) is below 48."""
    directory = tmp_path_factory.mktemp("limited")
    with running_server(directory, max_streams=MAX_STREAMS, max_concurrency=1, max_queue=2) as server:
        yield server


@pytest.fixture(scope="module")
def quick_idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """stream_idle_timeout_s=2, each decode step slowed to 50 ms."""
    directory = tmp_path_factory.mktemp("quick-idle")
    with running_server(directory, step_s=0.05, stream_idle_timeout_s=IDLE_TIMEOUT_S) as server:
        yield server


def channels(server: Server, count: int = CHANNELS) -> list[grpc.Channel]:
    return [server.channel() for _ in range(count)]


def close_all(channel_list: list[grpc.Channel]) -> None:
    for channel in channel_list:
        channel.close()


def ended(streams: list[OpenStream]) -> list[OpenStream]:
    return [stream for stream in streams if stream.ended_at is not None]


def test_health_and_capabilities_answer_beside_idle_streams_past_max_streams(limited: Server) -> None:
    idle = channels(limited)
    try:
        with open_streams(idle, MAX_STREAMS + PAST_THE_LIMIT):
            time.sleep(1.0)  # every stream has reached the server
            for _ in range(3):  # each probe on a new connection, as a kubelet's
                with limited.channel() as probe:
                    health_answers(probe, timeout=HEALTH_TIMEOUT_S)
                    stub = ml_service_pb2_grpc.InferenceStub(probe)
                    assert stub.GetCapabilities(empty_pb2.Empty(), timeout=HEALTH_TIMEOUT_S).model_ids
    finally:
        close_all(idle)


def test_streams_beyond_max_streams_are_refused_resource_exhausted_at_once(limited: Server) -> None:
    idle = channels(limited)
    try:
        with open_streams(idle, MAX_STREAMS + PAST_THE_LIMIT) as streams:
            wait_until(lambda: len(ended(streams)) >= PAST_THE_LIMIT, timeout=5.0)
            time.sleep(0.5)  # none more
            refused = ended(streams)
            codes = sorted({str(stream.code()) for stream in refused})
            assert len(refused) == PAST_THE_LIMIT, f"{len(refused)} of {len(streams)} refused ({codes})"
            assert {stream.code() for stream in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    finally:
        close_all(idle)


def test_a_generation_on_a_new_channel_is_served_beside_idle_streams_below_max_streams(limited: Server) -> None:
    idle = channels(limited)
    try:
        with open_streams(idle, MAX_STREAMS - 1) as streams:
            time.sleep(1.0)
            with limited.channel() as channel:
                answers = list(ml_service_pb2_grpc.InferenceStub(channel).Infer(iter([request()]), timeout=30))
            assert result_of(answers[-1])["generated_tokens"] == 4
            assert not ended(streams), "an idle stream below max_streams was ended"
    finally:
        close_all(idle)


def test_a_stream_opened_after_others_closed_is_served(limited: Server) -> None:
    """Closed streams give their places back: max_streams counts open streams, not streams ever opened."""
    for _ in range(2):
        idle = channels(limited)
        try:
            with open_streams(idle, MAX_STREAMS):
                time.sleep(0.5)
        finally:
            close_all(idle)
    with limited.channel() as channel:
        stream = OpenStream(channel)
        stream.send(request(correlation_id="after"))
        assert result_of(stream.final(timeout=30))["generated_tokens"] == 4
        stream.close()


def test_idle_streams_are_ended_unavailable_after_the_stream_idle_timeout(quick_idle: Server) -> None:
    idle = channels(quick_idle, 2)
    try:
        with open_streams(idle, 4) as streams:
            assert wait_until(lambda: len(ended(streams)) == len(streams), timeout=8.0), "idle streams still open"
            for stream in streams:
                assert stream.code() == grpc.StatusCode.UNAVAILABLE, (stream.code(), stream.details())
                assert "idle" in stream.details().lower(), stream.details()
                lifetime = (stream.ended_at or 0.0) - stream.opened
                assert IDLE_TIMEOUT_S - 0.1 <= lifetime <= IDLE_TIMEOUT_S + 3.0, lifetime
    finally:
        close_all(idle)


def test_a_stream_that_goes_quiet_after_an_answer_is_ended_after_the_idle_timeout(quick_idle: Server) -> None:
    with quick_idle.channel() as channel:
        stream = OpenStream(channel)
        stream.send(request(correlation_id="once"))
        result_of(stream.final(timeout=30))
        answered = time.monotonic()
        assert stream.ended(timeout=IDLE_TIMEOUT_S + 6.0), "the quiet stream is still open"
        assert stream.code() == grpc.StatusCode.UNAVAILABLE, (stream.code(), stream.details())
        assert (stream.ended_at or 0.0) - answered <= IDLE_TIMEOUT_S + 3.0


def test_a_long_generation_outlives_the_stream_idle_timeout(quick_idle: Server) -> None:
    tokens = 120  # 120 steps of 50 ms: three times the idle timeout
    with quick_idle.channel() as channel:
        stream = OpenStream(channel)
        started = time.monotonic()
        stream.send(request("vlm_generate_stream", correlation_id="long", max_new_tokens=tokens))
        final = stream.final(timeout=60)
        assert time.monotonic() - started > 2 * IDLE_TIMEOUT_S, "the generation did not outlast the timer"
        assert final.correlation_id == "long"
        assert result_of(final)["generated_tokens"] == tokens
        stream.close()


# The Go SDK pings every 10 s (Timeout 3 s) on every connection, idle or not. grpc's default
# server policy allows one ping per 5 minutes without data: it lets two early pings through,
# counts the next ones as strikes and sends GOAWAY "too_many_pings" at the fifth (measured on
# main: 1 s pings cut the stream after 5.0 s). Pings every 5.5 s (the Go SDK's 10 s would need
# 50 s; the server documents 5 s as allowed) would be cut after about 27.5 s; the stream is
# held 30 s.
PING_INTERVAL_MS = 5_500
HOLD_S = 30.0
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", PING_INTERVAL_MS),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # as Go: no cap on pings between data frames
)


def test_client_keepalive_pings_do_not_cut_an_idle_stream(limited: Server) -> None:
    with limited.channel(*KEEPALIVE_OPTIONS) as channel:
        stream = OpenStream(channel)
        assert not stream.ended(timeout=HOLD_S), f"cut after pings: {stream.code()} {stream.details()}"
        stream.send(request(correlation_id="after-pings"))
        assert result_of(stream.final(timeout=30))["generated_tokens"] == 4
        stream.close()


DEFAULT_MAX_STREAMS = 256


def test_the_default_max_streams_idle_streams_stay_open_and_health_answers(tmp_path: Path) -> None:
    """With the default max_streams, 256 idle streams are all kept, and health answers within 1 s."""
    with running_server(tmp_path, max_concurrency=1, max_queue=2) as server:
        idle = channels(server)
        try:
            with open_streams(idle, DEFAULT_MAX_STREAMS) as streams:
                time.sleep(2.0)
                with server.channel() as probe:
                    health_answers(probe, timeout=HEALTH_TIMEOUT_S)
                assert not ended(streams), f"{len(ended(streams))} of the default 256 streams were refused"
        finally:
            close_all(idle)
