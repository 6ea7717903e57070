"""The servicer called directly, as a hub may call it: with its own (or a bare) context."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2
from lumen_resources.lumen_config import Services

from lumen_vlm.fastvlm import FastVLMService, GeneralFastVLMService
from lumen_vlm.proto import ml_service_pb2
from lumen_vlm.resources.exceptions import ConfigError
from lumen_vlm.server import server_max_concurrent_rpcs, server_options, server_thread_pool_size

from .conftest import image_bytes, make_request, make_settings, result_of, wait_until

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


def test_from_settings_reads_the_tokenizer_for_grammars_before_any_request(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first constrained request does not pay for the grammar engine's tokenizer."""
    caplog.set_level("INFO", logger="lumen_vlm")
    service = FastVLMService.from_settings(make_settings(tiny_model_dir), tiny_model_dir)
    try:
        assert wait_until(lambda: "structured output ready" in caplog.text, timeout=30)
    finally:
        service.close()


def lumen_services(model: str, backend_settings: dict[str, Any] | None = None) -> Services:
    """The hub's `services.vlm` entry, as lumen-resources validated it."""
    return Services.model_validate(
        {
            "enabled": True,
            "package": "lumen_vlm",
            "import_info": {
                "registry_class": "lumen_vlm.fastvlm.GeneralFastVLMService",
                "add_to_server": "lumen_vlm.proto.ml_service_pb2_grpc.add_InferenceServicer_to_server",
            },
            "backend_settings": backend_settings or {"device": "cpu"},
            "models": {"fastvlm": {"model": model, "runtime": "onnx", "precision": "fp32"}},
        }
    )


def test_from_config_with_a_lumen_services_entry(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The hub's call, end to end: a real `Services` model, the real resolver, the real model."""
    local = shutil.copytree(tiny_model_dir, tmp_path / "my-model")
    service = GeneralFastVLMService.from_config(service_config=lumen_services(str(local)), cache_dir=tmp_path / "cache")
    try:
        request = make_request(image=image_bytes(), correlation_id="hub", max_new_tokens="3")
        (response,) = list(service.Infer(iter([request]), None))
        result = result_of(response)
        assert result["generated_tokens"] == 3 and result["model_id"] == "my-model"
        assert service.capability().model_ids == ["my-model"]
        assert service.settings.model.model == str(local)
    finally:
        service.close()


def test_from_config_refuses_unavailable_providers_before_any_download(tmp_path: Path) -> None:
    """The hub gets the same config error as the CLI, and no download starts for a machine that cannot run it."""
    services = lumen_services("fastvlm-0.5b", {"onnx_providers": ["NoSuchExecutionProvider"]})
    with pytest.raises(ConfigError, match=r"services\.vlm\.backend_settings\.onnx_providers"):
        GeneralFastVLMService.from_config(services, tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists()


def test_the_model_id_is_the_configured_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A known name is served under that name, not under the cache directory it resolved to."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache / "models" / "onnx-community--FastVLM-0.5B-ONNX")  # never downloaded
    service = GeneralFastVLMService.from_config(lumen_services("fastvlm-0.5b"), cache)
    try:
        (response,) = list(service.Infer(iter([make_request(prompt="hi", max_new_tokens="1")]), None))
        assert result_of(response)["model_id"] == "fastvlm-0.5b"
        assert service.capability().model_ids == ["fastvlm-0.5b"]
    finally:
        service.close()


def test_the_model_id_defaults_to_the_managers(manager: Any, tiny_model_dir: Path) -> None:
    assert FastVLMService(manager, make_settings(tiny_model_dir)).model_id == manager.spec.model_id == "tiny-fastvlm"
    named = FastVLMService(manager, make_settings(tiny_model_dir), model_id="my-name")
    (response,) = list(named.Infer(iter([make_request(prompt="hi", max_new_tokens="1")]), None))
    assert result_of(response)["model_id"] == "my-name"


def test_server_sizing(manager: Any, tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, max_concurrency=3, max_queue=5)
    service = FastVLMService(manager, settings)
    try:
        assert server_thread_pool_size(service) == 3 + 5 + 32
        assert server_max_concurrent_rpcs(service) == server_thread_pool_size(service)
    finally:
        service.close()
    limit = dict(server_options(settings))["grpc.max_receive_message_length"]
    assert limit > settings.limits.max_payload_bytes
