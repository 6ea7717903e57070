"""server.http and the API key in both forms of the config, and the command line's --http-port."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumen_vlm.resources.config import API_KEY_ENV, settings_from_mapping, single_service_config
from lumen_vlm.resources.exceptions import ConfigError
from lumen_vlm.resources.settings import HttpSettings
from lumen_vlm.server import settings_with_overrides

SHORT = {"services": {"vlm": {"models": {"fastvlm": {"model": "fastvlm-0.5b", "runtime": "onnx"}}}}}


def full(server: dict) -> dict:
    return single_service_config("vlm", "/tmp/lumen", "other", server, {"models": SHORT["services"]["vlm"]["models"]})


@pytest.mark.parametrize("form", ["short", "full"])
def test_http_block_in_both_forms(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    server = {
        "port": 50051,
        "http": {"port": 8080, "model_aliases": ["gemma3:latest"], "allowed_image_hosts": ["NAS.local"]},
    }
    data = {**SHORT, "server": server} if form == "short" else full(server)
    settings = settings_from_mapping(data, base_dir=Path("/tmp"))
    http = settings.server.http
    assert http is not None and http.port == 8080 and http.model_aliases == ("gemma3:latest",)
    assert http.allowed_image_hosts == ("nas.local",) and settings.server.http_host == settings.server.host
    empty = settings_from_mapping({**SHORT, "server": {"http": None}}, base_dir=Path("/tmp"))
    assert empty.server.http == HttpSettings()  # the block alone: every default (port 11434)
    assert settings_from_mapping(SHORT, base_dir=Path("/tmp")).server.http is None  # no block: gRPC only


def test_http_block_typos_and_types_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"server\.http\.prot: unknown key"):
        settings_from_mapping({**SHORT, "server": {"http": {"prot": 1}}}, base_dir=Path("/tmp"))
    with pytest.raises(ConfigError, match=r"server\.http\.port"):
        settings_from_mapping({**SHORT, "server": {"http": {"port": "80"}}}, base_dir=Path("/tmp"))


def test_api_key_from_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    data = {**SHORT, "server": {"api_key": "from-file"}}
    assert settings_from_mapping(data, base_dir=Path("/tmp")).server.api_key == "from-file"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert settings_from_mapping(data, base_dir=Path("/tmp")).server.api_key == "from-env"
    assert settings_from_mapping(SHORT, base_dir=Path("/tmp")).server.api_key == "from-env"
    monkeypatch.setenv(API_KEY_ENV, "has space")
    with pytest.raises(ConfigError, match=API_KEY_ENV):
        settings_from_mapping(SHORT, base_dir=Path("/tmp"))


def test_http_port_on_the_command_line_turns_http_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    settings = settings_from_mapping(SHORT, base_dir=Path("/tmp"))
    overridden = settings_with_overrides(settings, None, 50052, 8081)
    assert overridden.server.port == 50052 and overridden.server.http == HttpSettings(port=8081)
