"""GetCapabilities, StreamCapabilities and Health over the wire: real values, no placeholders."""

from __future__ import annotations

from google.protobuf import empty_pb2

import lumen_vlm

from .conftest import CALL_TIMEOUT, Served

JSON_MIME = "application/json;schema=text_generation_v1"
TEXT_MIME = "text/plain;charset=utf-8"
IMAGE_MIMES = ["image/jpeg", "image/png", "image/webp"]


def test_get_capabilities(served: Served) -> None:
    capability = served.stub.GetCapabilities(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    settings = served.service.settings
    assert capability.service_name == "lumen-vlm"
    assert list(capability.model_ids) == ["tiny-fastvlm"]
    assert capability.runtime == "onnxrt-cpu"
    assert capability.max_concurrency == settings.admission.max_concurrency == 2
    assert list(capability.precisions) == ["fp32"]
    assert capability.protocol_version == "1.0.0"

    extra = capability.extra
    assert extra["version"] == lumen_vlm.__version__
    assert extra["model_name"] == settings.model.model
    assert extra["providers"] == "CPUExecutionProvider"
    assert extra["image_size"] == "256"
    assert extra["image_tokens"] == "16"
    assert extra["context_length"] == "1024"
    assert float(extra["load_time_ms"]) > 0
    assert extra["resize_mode"] == "pad"

    tasks = {task.name: task for task in capability.tasks}
    assert set(tasks) == {"vlm_generate", "vlm_generate_stream"}
    assert list(tasks["vlm_generate"].output_mimes) == [JSON_MIME]
    assert list(tasks["vlm_generate_stream"].output_mimes) == [JSON_MIME, TEXT_MIME]
    for task in tasks.values():
        assert list(task.input_mimes) == IMAGE_MIMES
        limits = task.limits
        assert limits["max_payload_bytes"] == str(settings.limits.max_payload_bytes)
        assert limits["max_image_pixels"] == str(served.service.manager.image_limits.max_pixels)
        assert limits["max_new_tokens"] == str(settings.limits.max_new_tokens)
        assert limits["context_length"] == "1024"
        assert limits["max_concurrency"] == "2"


def test_stream_capabilities_yields_the_capability_once(served: Served) -> None:
    streamed = list(served.stub.StreamCapabilities(empty_pb2.Empty(), timeout=CALL_TIMEOUT))
    assert streamed == [served.stub.GetCapabilities(empty_pb2.Empty(), timeout=CALL_TIMEOUT)]


def test_health(served: Served) -> None:
    assert served.stub.Health(empty_pb2.Empty(), timeout=CALL_TIMEOUT) == empty_pb2.Empty()
