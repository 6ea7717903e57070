"""GetCapabilities, StreamCapabilities and Health over the wire: real values, no placeholders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2

import lumen_vlm
from lumen_vlm.engine import Engine
from lumen_vlm.fastvlm.fastvlm_model import ModelDescription
from lumen_vlm.fastvlm.fastvlm_service import FastVLMService
from lumen_vlm.fastvlm.image import image_limits
from lumen_vlm.resources.model_spec import ResizeMode

from .conftest import CALL_TIMEOUT, JSON_MIME, TEXT_MIME, Served, make_settings

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
    # The tiny export's config.json names no image_aspect_ratio and its preprocessor centre-crops.
    assert extra["resize_mode"] == "crop"

    tasks = {task.name: task for task in capability.tasks}
    assert set(tasks) == {"vlm_generate", "vlm_generate_stream"}
    assert list(tasks["vlm_generate"].output_mimes) == [JSON_MIME]
    assert list(tasks["vlm_generate_stream"].output_mimes) == [JSON_MIME, TEXT_MIME]
    for task in tasks.values():
        assert list(task.input_mimes) == IMAGE_MIMES
        limits = task.limits
        assert limits["max_payload_bytes"] == str(settings.limits.max_payload_bytes)
        assert limits["max_image_pixels"] == str(settings.limits.max_image_pixels)
        assert limits["max_new_tokens"] == str(settings.limits.max_new_tokens)
        assert limits["max_stop_sequences"] == str(settings.limits.max_stop_sequences)
        assert limits["max_stop_sequence_chars"] == str(settings.limits.max_stop_sequence_chars)
        assert limits["max_messages_chars"] == str(settings.limits.max_messages_chars)
        assert limits["max_correlation_id_bytes"] == "256"
        assert limits["context_length"] == "1024"
        assert limits["max_concurrency"] == "2"


def test_stream_capabilities_yields_the_capability_once(served: Served) -> None:
    streamed = list(served.stub.StreamCapabilities(empty_pb2.Empty(), timeout=CALL_TIMEOUT))
    assert streamed == [served.stub.GetCapabilities(empty_pb2.Empty(), timeout=CALL_TIMEOUT)]


def test_health(served: Served) -> None:
    assert served.stub.Health(empty_pb2.Empty(), timeout=CALL_TIMEOUT) == empty_pb2.Empty()


def test_the_managers_description_is_a_typed_record(manager: Any) -> None:
    described = manager.describe()
    assert described == ModelDescription(
        model_id="tiny-fastvlm",
        runtime="onnxrt-cpu",
        providers=("CPUExecutionProvider",),
        precision="fp32",
        precisions=("fp32",),
        load_time_ms=described.load_time_ms,
        image_size=256,
        image_tokens=16,
        resize_mode=ResizeMode.CROP,  # the tiny export's preprocessor centre-crops
        context_length=1024,
    )
    assert described.load_time_ms > 0


class DynamicImageTokens:
    """The real manager, with a vision graph that leaves the image token count dynamic."""

    def __init__(self, manager: Any) -> None:
        self._manager = manager

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def describe(self) -> ModelDescription:
        return replace(self._manager.describe(), image_tokens=None)


def test_unknown_image_tokens_are_left_out(manager: Any, tiny_model_dir: Path) -> None:
    capability = FastVLMService(DynamicImageTokens(manager), make_settings(tiny_model_dir)).capability()
    assert "image_tokens" not in capability.extra
    assert all(value != "" for value in capability.extra.values())


class NoBackend:
    """The real manager, minus the backend and the model spec: the service must not reach into them."""

    def __init__(self, manager: Any) -> None:
        self._manager = manager

    def __getattr__(self, name: str) -> Any:
        if name in {"backend", "spec", "image_limits"}:
            raise AssertionError(f"the service reached into manager.{name}")
        return getattr(self._manager, name)


def test_capabilities_come_from_the_managers_description(manager: Any, tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir)
    engine = Engine(manager, settings.admission, settings.limits)  # the engine may read the spec; the service not
    try:
        capability = FastVLMService(NoBackend(manager), settings, engine=engine).capability()
    finally:
        engine.close()
    assert capability.runtime == "onnxrt-cpu" and capability.extra["image_tokens"] == "16"


def test_advertised_limits_come_from_the_settings(manager: Any, tiny_model_dir: Path) -> None:
    """The request checks read the settings, so the capability does too (never the manager's own)."""
    settings = make_settings(tiny_model_dir, max_image_pixels=1_234_567, max_payload_bytes=7_654_321)
    limits = FastVLMService(manager, settings).capability().tasks[0].limits
    assert (limits["max_image_pixels"], limits["max_payload_bytes"]) == ("1234567", "7654321")


def test_advertised_image_limits_are_the_enforced_ones(tiny_model_dir: Path) -> None:
    """from_settings builds the decoder's limits from the settings the capability reports."""
    settings = make_settings(tiny_model_dir, max_image_pixels=1_234_567)
    service = FastVLMService.from_settings(settings, tiny_model_dir)
    try:
        assert service.manager.image_limits == image_limits(settings.limits)
        limits = service.capability().tasks[0].limits
        assert limits["max_image_pixels"] == "1234567"
        assert limits["max_payload_bytes"] == str(service.manager.image_limits.max_bytes)
    finally:
        service.close()
