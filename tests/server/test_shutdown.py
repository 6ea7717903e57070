"""Graceful shutdown of the whole server (gRPC + health + service), in process, on a slowed model."""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lumen_vlm.fastvlm.fastvlm_service import FastVLMService
from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc
from lumen_vlm.resources.settings import ServerSettings
from lumen_vlm.server import ShutdownSignals, VLMServer

from ..service.conftest import ThrottledManager, long_stream, make_settings, wait_until


def start(manager: Any, tiny_model_dir: Path, grace_s: float) -> VLMServer:
    settings = make_settings(tiny_model_dir, shutdown_grace_s=grace_s)
    settings = replace(settings, server=ServerSettings(host="127.0.0.1", port=0))
    server = VLMServer(settings)
    server.start()
    server.install(FastVLMService(manager, settings))
    return server


def shut_down_while_streaming(
    manager: Any, tiny_model_dir: Path, grace_s: float
) -> tuple[grpc.Channel, Any, threading.Thread]:
    """Start a long streaming generation, wait for its first partial, then begin shutdown."""
    server = start(manager, tiny_model_dir, grace_s=grace_s)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    responses = ml_service_pb2_grpc.InferenceStub(channel).Infer(iter([long_stream()]), timeout=120)
    assert not next(responses).is_final
    stopper = threading.Thread(target=server.shutdown)
    stopper.start()
    return channel, responses, stopper


def test_in_flight_generation_finishes_within_the_grace_period(manager: Any, tiny_model_dir: Path) -> None:
    slow = ThrottledManager(manager, step_s=0.01)  # ~400 events x 10 ms: seconds, well inside 60 s
    channel, responses, stopper = shut_down_while_streaming(slow, tiny_model_dir, grace_s=60.0)
    health = health_pb2_grpc.HealthStub(channel)
    assert wait_until(
        lambda: (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
    )
    assert slow.running == 1, "the generation is still in flight after shutdown began"
    final = list(responses)[-1]
    stopper.join(timeout=60)
    channel.close()
    assert final.is_final and not final.HasField("error"), final
    assert json.loads(final.result)["finish_reason"] in ("length", "eos_token")


def test_generations_past_the_grace_period_are_cancelled(manager: Any, tiny_model_dir: Path) -> None:
    held = ThrottledManager(manager, step_s=0.2)  # 400 events x 0.2 s: far past the grace period
    channel, responses, stopper = shut_down_while_streaming(held, tiny_model_dir, grace_s=0.5)
    try:
        rest = list(responses)
        final = rest[-1] if rest else None
    except grpc.RpcError as exc:  # the server may close the call itself
        final = None
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    if final is not None:
        assert final.is_final and final.error.code == ml_service_pb2.ERROR_CODE_UNAVAILABLE
    stopper.join(timeout=60)
    channel.close()
    assert not stopper.is_alive()
    assert held.running == 0 and held.finished, "the held generation was stopped"


def test_a_signal_caught_by_another_thread_still_ends_the_wait_for_it() -> None:
    """The kernel may hand SIGTERM to any of grpc's or ORT's threads; Python then runs the handler
    only when the main thread next runs bytecode, which a main thread blocked on a lock never does."""
    signals = ShutdownSignals()
    previous = signal.signal(signal.SIGUSR1, signals)
    main_thread = threading.get_ident()
    # Half a second into the wait, a timer thread takes the signal itself.
    sender = threading.Timer(0.5, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGUSR1))
    # Should the wait block for good, this wakes it after 20 s, so that the test fails, not hangs.
    rescue = threading.Timer(20.0, signal.pthread_kill, (main_thread, signal.SIGUSR1))
    try:
        sender.start()
        rescue.start()
        started = time.monotonic()
        signals.wait_for_first()
        assert time.monotonic() - started < 10.0
        assert signals.count == 1 and not signals.forced()
    finally:
        sender.cancel()
        rescue.cancel()
        signal.signal(signal.SIGUSR1, previous)
