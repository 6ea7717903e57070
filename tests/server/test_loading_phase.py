"""While the model loads, the port is open: health NOT_SERVING, requests UNAVAILABLE."""

from __future__ import annotations

import json
import queue
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

from ..service.conftest import make_request, make_settings


def test_requests_before_and_after_the_model_is_ready(manager: Any, tiny_model_dir: Path) -> None:
    settings = replace(make_settings(tiny_model_dir), server=ServerSettings(host="127.0.0.1", port=0))
    server = VLMServer(settings)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = ml_service_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Health(empty_pb2.Empty(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:
            stub.GetCapabilities(empty_pb2.Empty(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        # One stream opened while loading: its first request is refused, its second (sent after
        # the model is ready) is served.
        outbox: queue.Queue[Any] = queue.Queue()
        responses = stub.Infer(iter(outbox.get, None), timeout=60)
        outbox.put(make_request("vlm_generate", correlation_id=""))
        early = next(responses)
        assert early.error.code == ml_service_pb2.ERROR_CODE_UNAVAILABLE
        assert "loading" in early.error.message
        assert early.correlation_id, "an id is made up when the client sent none"

        server.install(FastVLMService(manager, settings))
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
        outbox.put(make_request("vlm_generate", correlation_id="after"))
        late = next(responses)
        outbox.put(None)
        assert late.correlation_id == "after" and not late.HasField("error"), late
        assert json.loads(late.result)["generated_tokens"] >= 1
    finally:
        channel.close()
        server.shutdown()
