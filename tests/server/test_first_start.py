"""A first start that downloads the model: the port is open, health NOT_SERVING, during the download.

The server is the real one, in a process of its own, downloading with the real huggingface_hub
client from a hub on 127.0.0.1 that holds every request until the test lets it answer.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lumen_vlm.proto import ml_service_pb2, ml_service_pb2_grpc

from ..conftest import TINY_MODEL
from ..resources.loopback_hub import LoopbackHub, loopback_hub
from .test_server_process import START_TIMEOUT_S, ServerProcess, free_port, index_of, write_config

REPO = "lumen-test/tiny-fastvlm"


@pytest.fixture
def hub() -> Iterator[LoopbackHub]:
    with loopback_hub(REPO, TINY_MODEL) as hub:
        hub.hold()
        yield hub


def start_server(tmp_path: Path, hub: LoopbackHub, model: str = REPO) -> tuple[ServerProcess, int]:
    """The server, its model to be downloaded from `hub`; every cache in tmp_path."""
    port = free_port()
    config = write_config(tmp_path / "config.yaml", port, model=model)
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    return ServerProcess(
        [sys.executable, "-m", "lumen_vlm", "--config", str(config)], env={**env, "HOME": str(tmp_path)}
    ), port


def wait_for_the_download(proc: ServerProcess, hub: LoopbackHub) -> None:
    assert hub.received.wait(START_TIMEOUT_S), "".join(proc.lines)


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_health_is_not_serving_while_the_model_downloads(hub: LoopbackHub, tmp_path: Path) -> None:
    proc, port = start_server(tmp_path, hub)
    try:
        wait_for_the_download(proc, hub)
        assert health(port) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = ml_service_pb2.InferRequest(correlation_id="early", task="vlm_generate", meta={"prompt": "Hi"})
            (answer,) = ml_service_pb2_grpc.InferenceStub(channel).Infer(iter([request]), timeout=10)
        assert answer.error.code == ml_service_pb2.ERROR_CODE_UNAVAILABLE
        hub.release()
        proc.wait_for(f"listening on 127.0.0.1:{port}")
        assert health(port) == health_pb2.HealthCheckResponse.SERVING
        assert index_of(proc.lines, f"port {port} open") < index_of(proc.lines, "downloading")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = ml_service_pb2.InferRequest(correlation_id="late", task="vlm_generate", meta={"prompt": "Hi"})
            (answer,) = ml_service_pb2_grpc.InferenceStub(channel).Infer(iter([request]), timeout=60)
        assert not answer.HasField("error"), answer
        assert json.loads(answer.result)["model_id"] == REPO
        assert proc.stop() == 0
    finally:
        proc.kill()


def test_a_download_that_fails_after_the_port_opened_exits_2_with_the_reason(hub: LoopbackHub, tmp_path: Path) -> None:
    proc, port = start_server(tmp_path, hub, model="lumen-test/no-such-model")
    try:
        wait_for_the_download(proc, hub)
        assert health(port) == health_pb2.HealthCheckResponse.NOT_SERVING
        hub.release()  # the hub answers: no such repo
        assert proc.exit_code(timeout=60) == 2
    finally:
        proc.kill()
    output = "".join(proc.lines)
    assert "could not download lumen-test/no-such-model" in output
    assert "the hub has no such repo" in output and "set services.vlm.models.fastvlm.model to it" in output
    assert "Traceback" not in output
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert not (tmp_path / "cache" / "models" / "lumen-test--no-such-model").exists()


def test_sigterm_during_the_download_stops_at_once_with_0(hub: LoopbackHub, tmp_path: Path) -> None:
    proc, _ = start_server(tmp_path, hub)
    try:
        wait_for_the_download(proc, hub)
        proc.process.terminate()
        assert proc.exit_code(timeout=30) == 0  # the held download would hold it for a minute
    finally:
        proc.kill()
    assert any("stopped before the model was ready" in line for line in proc.lines), "".join(proc.lines)
