"""The servicer called directly, as a hub may call it: with its own (or a bare) context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from lumen_vlm.fastvlm import FastVLMService, GeneralFastVLMService
from lumen_vlm.proto import ml_service_pb2

from .conftest import image_bytes, make_request, make_settings, result_of

DEADLINE = ml_service_pb2.ERROR_CODE_DEADLINE_EXCEEDED
UNAVAILABLE = ml_service_pb2.ERROR_CODE_UNAVAILABLE


class HubContext:
    """A context with only some of grpc's methods, some of them returning odd values."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining
        self.aborted: tuple[Any, str] | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    def abort(self, code: Any, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError(details)


@pytest.fixture
def service(manager: Any, tiny_model_dir: Path) -> FastVLMService:
    direct = FastVLMService(manager, make_settings(tiny_model_dir))
    yield direct
    direct.close()


def test_exports() -> None:
    assert GeneralFastVLMService is FastVLMService


@pytest.mark.parametrize("context", [object(), None, HubContext()])
def test_any_context_object_works(service: FastVLMService, context: Any) -> None:
    requests = [
        make_request(image=image_bytes(), correlation_id="a", max_new_tokens="3"),
        make_request("vlm_generate_stream", prompt="hi", correlation_id="b", max_new_tokens="3"),
    ]
    responses = list(service.Infer(iter(requests), context))
    finals = [r for r in responses if r.is_final]
    assert [r.correlation_id for r in finals] == ["a", "b"]
    assert result_of(finals[0])["generated_tokens"] == 3
    assert service.in_flight == 0


def test_a_passed_deadline_is_answered_in_band(service: FastVLMService) -> None:
    responses = list(service.Infer(iter([make_request(image=image_bytes(), correlation_id="x")]), HubContext(0.0)))
    (response,) = responses
    assert response.is_final and response.error.code == DEADLINE
    assert service.in_flight == 0


def test_supported_tasks(service: FastVLMService) -> None:
    assert service.get_supported_tasks() == ["vlm_generate", "vlm_generate_stream"]


def test_health_with_a_foreign_context(service: FastVLMService) -> None:
    context = HubContext()
    assert service.Health(empty_pb2.Empty(), context) == empty_pb2.Empty()
    service.begin_shutdown()
    with pytest.raises(RuntimeError):
        service.Health(empty_pb2.Empty(), context)
    assert context.aborted is not None and "shutting down" in context.aborted[1]


def test_after_close_requests_are_unavailable(service: FastVLMService) -> None:
    service.close()
    (response,) = list(service.Infer(iter([make_request(prompt="hi")]), None))
    assert response.error.code == UNAVAILABLE


def test_an_internal_error_is_answered_and_logged(
    service: FastVLMService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug of ours")

    monkeypatch.setattr(service.manager, "prepare", broken)
    requests = [make_request(prompt="hi", correlation_id="bug")]
    (response,) = list(service.Infer(iter(requests), None))
    assert response.error.code == ml_service_pb2.ERROR_CODE_INTERNAL
    assert "a bug of ours" not in response.error.message  # internals stay in the log
    assert any(record.exc_info and "bug" in record.getMessage() for record in caplog.records)


def test_from_settings_loads_and_closes(tiny_model_dir: Path) -> None:
    service = FastVLMService.from_settings(make_settings(tiny_model_dir), tiny_model_dir)
    try:
        (response,) = list(service.Infer(iter([make_request(prompt="hi", max_new_tokens="2")]), None))
        assert result_of(response)["generated_tokens"] == 2
        assert service.capability().model_ids == ["tiny-fastvlm"]
    finally:
        service.close()


def test_from_config_resolves_then_loads(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """from_config wires the resources layer's two calls together; they are stubbed here."""
    import sys
    import types

    calls: list[Any] = []
    settings = make_settings(tiny_model_dir)

    def settings_from_service_config(service_config: Any, cache_dir: Any) -> Any:
        calls.append(("settings", service_config, cache_dir))
        return settings

    def resolve_model(resolved: Any, download: bool = True, progress: bool = True) -> Path:
        calls.append(("resolve", resolved))
        return tiny_model_dir

    config_module = types.ModuleType("lumen_vlm.resources.config")
    config_module.settings_from_service_config = settings_from_service_config  # type: ignore[attr-defined]
    loader_module = types.ModuleType("lumen_vlm.resources.loader")
    loader_module.resolve_model = resolve_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lumen_vlm.resources.config", config_module)
    monkeypatch.setitem(sys.modules, "lumen_vlm.resources.loader", loader_module)

    service = FastVLMService.from_config({"models": {}}, "/tmp/cache")
    try:
        assert calls == [("settings", {"models": {}}, "/tmp/cache"), ("resolve", settings)]
        (response,) = list(service.Infer(iter([make_request(prompt="hi", max_new_tokens="1")]), None))
        assert json.loads(response.result)["generated_tokens"] == 1
    finally:
        service.close()
