"""The HTTP front door on a real loopback port, beside the gRPC one, over the tiny model: the
whole `VLMServer` as `lumen-vlm` runs it, so both transports share one engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from lumen_vlm.fastvlm.fastvlm_service import FastVLMService
from lumen_vlm.proto import ml_service_pb2_grpc
from lumen_vlm.resources.settings import HttpSettings
from lumen_vlm.server import VLMServer

from ..service.conftest import CHANNEL_OPTIONS, make_settings


@dataclass
class Both:
    server: VLMServer
    service: FastVLMService
    base: str  # http://127.0.0.1:PORT
    stub: ml_service_pb2_grpc.InferenceStub
    channel: grpc.Channel

    def stop(self) -> None:
        self.channel.close()
        self.server.shutdown()


def start_both(manager: Any, model_dir: Path, api_key: str | None = None, **overrides: Any) -> Both:
    settings = make_settings(model_dir, **overrides)
    http = HttpSettings(host="127.0.0.1", port=0, model_aliases=("fastvlm:0.5b",))
    server_settings = replace(settings.server, host="127.0.0.1", port=0, http=http, api_key=api_key)
    settings = replace(settings, server=server_settings)
    server = VLMServer(settings)
    server.start()
    service = FastVLMService(manager, settings)
    server.install(service)
    assert server.http is not None
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=CHANNEL_OPTIONS)
    stub = ml_service_pb2_grpc.InferenceStub(channel)
    return Both(server, service, f"http://127.0.0.1:{server.http.port}", stub, channel)


@pytest.fixture(scope="module")
def both(manager: Any, tiny_model_dir: Path) -> Iterator[Both]:
    served = start_both(manager, tiny_model_dir)
    yield served
    served.stop()


@pytest.fixture
def start(manager: Any, tiny_model_dir: Path) -> Iterator[Callable[..., Both]]:
    started: list[Both] = []

    def make(model: Any = None, **overrides: Any) -> Both:
        served = start_both(model or manager, tiny_model_dir, **overrides)
        started.append(served)
        return served

    yield make
    for served in started:
        served.stop()
