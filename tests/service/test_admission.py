"""Admission: the concurrency limit, the queue, cancellation, deadlines and shutdown.

A `ThrottledManager` makes generations last (or holds them) so each test acts while one runs,
whatever this machine's speed; every wait is a bounded poll.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from lumen_vlm.proto import ml_service_pb2

from .conftest import (
    CALL_TIMEOUT,
    LONG,
    Served,
    ThrottledManager,
    image_bytes,
    infer,
    long_stream,
    make_request,
    result_of,
    wait_until,
)

UNAVAILABLE = ml_service_pb2.ERROR_CODE_UNAVAILABLE
DEADLINE = ml_service_pb2.ERROR_CODE_DEADLINE_EXCEEDED


def short(correlation_id: str = "short") -> ml_service_pb2.InferRequest:
    return make_request(image=image_bytes(), correlation_id=correlation_id, max_new_tokens="2")


@pytest.fixture
def held(manager: Any) -> ThrottledManager:
    """Generations pause after each event until released."""
    throttled = ThrottledManager(manager, step_s=CALL_TIMEOUT)
    yield throttled
    throttled.release()


@pytest.fixture
def slow(manager: Any) -> ThrottledManager:
    """Generations run, slowly: 400 tokens take several seconds."""
    throttled = ThrottledManager(manager, step_s=0.02)
    yield throttled
    throttled.release()


def test_a_request_over_the_limit_is_refused_at_once(
    start_server: Callable[..., Served], held: ThrottledManager
) -> None:
    server = start_server(held, max_concurrency=1, max_queue=0)
    running = server.stub.Infer(iter([long_stream()]), timeout=CALL_TIMEOUT)
    first = next(running)
    assert not first.is_final and server.service.in_flight == 1

    (refused,) = infer(server, [short("second")])
    assert refused.correlation_id == "second" and refused.is_final
    assert refused.error.code == UNAVAILABLE
    assert "busy" in refused.error.message
    assert held.running == 1  # the first generation was untouched

    held.release()
    rest = list(running)
    assert result_of(rest[-1])["generated_tokens"] == 400
    assert wait_until(lambda: server.service.in_flight == 0)
    (after,) = infer(server, [short("after")])
    assert result_of(after)["generated_tokens"] == 2


def test_a_queued_request_waits_for_the_slot(start_server: Callable[..., Served], held: ThrottledManager) -> None:
    server = start_server(held, max_concurrency=1, max_queue=1)
    running = server.stub.Infer(iter([long_stream()]), timeout=CALL_TIMEOUT)
    next(running)
    queued = server.stub.Infer(iter([short("queued")]), timeout=CALL_TIMEOUT)
    assert wait_until(lambda: server.service.queued == 1)
    (third,) = infer(server, [short("third")])
    assert third.error.code == UNAVAILABLE  # one running, one waiting: the queue is full
    held.release()
    assert result_of(list(queued)[-1])["generated_tokens"] == 2
    assert list(running)[-1].is_final


def test_the_queue_timeout_answers_unavailable(start_server: Callable[..., Served], held: ThrottledManager) -> None:
    server = start_server(held, max_concurrency=1, max_queue=1, queue_timeout_s=0.2)
    running = server.stub.Infer(iter([long_stream()]), timeout=CALL_TIMEOUT)
    next(running)
    (timed_out,) = infer(server, [short("waiter")])
    assert timed_out.error.code == UNAVAILABLE and "within" in timed_out.error.message
    assert server.service.queued == 0
    running.cancel()


def test_cancelling_a_stream_frees_its_slot(start_server: Callable[..., Served], slow: ThrottledManager) -> None:
    server = start_server(slow, max_concurrency=1, max_queue=0)
    call = server.stub.Infer(iter([long_stream()]), timeout=CALL_TIMEOUT)
    first = next(call)
    assert not first.is_final
    call.cancel()

    # The generation stops within a step or two and gives its slot back.
    assert wait_until(lambda: slow.running == 0 and server.service.in_flight == 0)
    (cancelled_events,) = slow.finished
    assert cancelled_events < 400
    admitted = None
    for _ in range(100):  # bounded: a request is admitted once the slot is free
        (response,) = infer(server, [short("next")])
        if not response.HasField("error"):
            admitted = response
            break
        assert response.error.code == UNAVAILABLE
    assert admitted is not None and result_of(admitted)["generated_tokens"] == 2
    assert slow.finished[0] == cancelled_events  # the cancelled generation stayed stopped


def test_cancelling_a_non_streaming_request(start_server: Callable[..., Served], slow: ThrottledManager) -> None:
    server = start_server(slow, max_concurrency=1, max_queue=0)
    request = make_request(image=image_bytes(), correlation_id="quiet", max_new_tokens=LONG)
    call = server.stub.Infer(iter([request]), timeout=CALL_TIMEOUT)
    assert slow.first_event.wait(CALL_TIMEOUT)
    call.cancel()
    assert wait_until(lambda: slow.running == 0 and server.service.in_flight == 0)
    assert slow.finished[0] < 400


def test_a_deadline_stops_the_generation(start_server: Callable[..., Served], slow: ThrottledManager) -> None:
    server = start_server(slow, max_concurrency=1, max_queue=0)
    request = make_request(image=image_bytes(), correlation_id="late", max_new_tokens=LONG)
    # 400 throttled steps take at least 8 s: far past the 1 s deadline. The client sees the
    # deadline as the call's status, or in-band if the error response won the race.
    try:
        responses = infer(server, [request], timeout=1.0)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        assert responses[-1].is_final and responses[-1].error.code == DEADLINE
    assert wait_until(lambda: slow.running == 0 and server.service.in_flight == 0)
    assert slow.finished[0] < 400
    (after,) = infer(server, [short("after")])
    assert result_of(after)["generated_tokens"] == 2


def test_a_deadline_while_queued(start_server: Callable[..., Served], held: ThrottledManager) -> None:
    server = start_server(held, max_concurrency=1, max_queue=1, queue_timeout_s=CALL_TIMEOUT)
    running = server.stub.Infer(iter([long_stream()]), timeout=CALL_TIMEOUT)
    next(running)
    # The deadline reaches the client either as the call's status or, when the service's own
    # answer wins the race, as an in-band DEADLINE_EXCEEDED error: both are right.
    try:
        (answer,) = infer(server, [short("queued")], timeout=0.5)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        assert answer.is_final and answer.error.code == DEADLINE, answer
    assert wait_until(lambda: server.service.queued == 0)
    running.cancel()


def test_shutdown(start_server: Callable[..., Served], held: ThrottledManager) -> None:
    server = start_server(held, max_concurrency=2, max_queue=2)
    service = server.service
    assert server.stub.Health(empty_pb2.Empty(), timeout=CALL_TIMEOUT) == empty_pb2.Empty()
    running = server.stub.Infer(iter([long_stream()]), timeout=CALL_TIMEOUT)
    next(running)

    service.begin_shutdown()
    (refused,) = infer(server, [short("new")])
    assert refused.error.code == UNAVAILABLE and "shutting down" in refused.error.message
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.Health(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not service.wait_idle(timeout=0.05)  # the long generation still runs

    service.cancel_all()
    held.release()
    last = list(running)[-1]
    assert last.is_final and last.error.code == UNAVAILABLE and "shutting down" in last.error.message
    assert service.wait_idle(timeout=CALL_TIMEOUT)
    assert service.in_flight == 0


def test_in_flight_generations_may_finish_after_begin_shutdown(
    start_server: Callable[..., Served], held: ThrottledManager
) -> None:
    server = start_server(held)
    running = server.stub.Infer(iter([long_stream()]), timeout=CALL_TIMEOUT)
    next(running)
    server.service.begin_shutdown()
    held.release()
    assert result_of(list(running)[-1])["generated_tokens"] == 400
    assert server.service.wait_idle(timeout=CALL_TIMEOUT)
