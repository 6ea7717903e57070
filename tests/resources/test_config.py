"""Config loading: the seed README's short form, the full Lumen config, and every error naming its key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from lumen_resources import load_and_validate_config
from lumen_resources.lumen_config import Services

from lumen_vlm.resources.config import load_settings, settings_from_mapping, settings_from_service_config
from lumen_vlm.resources.exceptions import ConfigError
from lumen_vlm.resources.settings import CacheSettings

# The seed README's "Configuration" example, verbatim.
SEED_README_YAML = """\
cache_dir: "~/.cache/lumen"
services:
  vlm:
    models:
      fastvlm:
        model: "fastvlm-2b"
        runtime: "onnx"
    backend_settings:
      device: "cuda"  # or "cpu", "mps"
      max_new_tokens: 512
"""

FULL_YAML = """\
metadata:
  version: "1.0.0"
  region: other
  cache_dir: "{cache_dir}"
deployment:
  mode: single
  service: vlm
server:
  port: 50051
  host: 127.0.0.1
  mdns:
    enabled: true
    service_name: lumen-vlm
services:
  vlm:
    enabled: true
    package: lumen_vlm
    import_info:
      registry_class: lumen_vlm.fastvlm.GeneralFastVLMService
      add_to_server: lumen_vlm.proto.ml_service_pb2_grpc.add_InferenceServicer_to_server
    backend_settings:
      device: cpu
      max_new_tokens: 256
      max_concurrency: 2
    models:
      fastvlm:
        model: onnx-community/FastVLM-0.5B-ONNX
        runtime: onnx
        precision: int8
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def full_config(tmp_path: Path) -> dict:
    return yaml.safe_load(FULL_YAML.format(cache_dir=tmp_path / "cache"))


def test_seed_readme_config_loads_verbatim(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SEED_README_YAML))
    assert settings.model.alias == "fastvlm"
    assert settings.model.model == "fastvlm-2b"
    assert settings.model.runtime == "onnx"
    assert settings.model.precision == "fp32"
    assert settings.backend.device == "cuda"
    assert settings.limits.default_max_new_tokens == 512
    assert settings.cache_dir == Path("~/.cache/lumen").expanduser()
    assert settings.server.port == 50051
    assert settings.config_dir == tmp_path.resolve()


def test_full_lumen_config_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL_YAML.format(cache_dir=tmp_path / "cache")))
    assert settings.cache_dir == tmp_path / "cache"
    assert settings.region == "other"
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 50051)
    assert settings.server.mdns.enabled and settings.server.mdns.service_name == "lumen-vlm"
    assert settings.model.alias == "fastvlm"
    assert settings.model.model == "onnx-community/FastVLM-0.5B-ONNX"
    assert settings.model.precision == "int8"
    assert settings.backend.device == "cpu"
    assert settings.limits.default_max_new_tokens == 256
    assert settings.admission.max_concurrency == 2


def test_vlm_settings_block_passes_lumen_resources_own_validation(tmp_path: Path) -> None:
    """In a vlm_settings block, the VLM keys leave the file valid for the Lumen hub too."""
    data = full_config(tmp_path)
    backend = data["services"]["vlm"]["backend_settings"]
    data["services"]["vlm"]["vlm_settings"] = {
        "max_new_tokens": backend.pop("max_new_tokens"),
        "max_concurrency": backend.pop("max_concurrency"),
        "max_queue": 0,
        "queue_timeout_s": 5,
        "max_image_pixels": 1_000_000,
        "intra_op_threads": 4,
    }
    path = write(tmp_path, yaml.safe_dump(data))
    load_and_validate_config(path)  # lumen-resources accepts it as is
    settings = load_settings(path)
    assert settings.limits.default_max_new_tokens == 256
    assert settings.admission.max_concurrency == 2
    assert settings.admission.max_queue == 0
    assert settings.admission.queue_timeout_s == 5.0
    assert settings.limits.max_image_pixels == 1_000_000
    assert settings.backend.intra_op_threads == 4


def test_cache_budgets_are_settings_in_either_place(tmp_path: Path) -> None:
    data = full_config(tmp_path)
    data["services"]["vlm"]["vlm_settings"] = {"feature_cache_bytes": 0}  # 0: no feature cache
    data["services"]["vlm"]["backend_settings"]["prefix_cache_bytes"] = 1 << 20
    settings = settings_from_mapping(data)
    assert (settings.caches.feature_cache_bytes, settings.caches.prefix_cache_bytes) == (0, 1 << 20)
    assert settings_from_mapping(full_config(tmp_path)).caches == CacheSettings()  # unset: the defaults
    assert CacheSettings() == CacheSettings(feature_cache_bytes=64 << 20, prefix_cache_bytes=256 << 20)


def test_caller_mapping_is_not_modified(tmp_path: Path) -> None:
    data = full_config(tmp_path)
    before = yaml.safe_dump(data)
    settings_from_mapping(data)
    assert yaml.safe_dump(data) == before


def test_short_form_defaults(tmp_path: Path) -> None:
    text = "services:\n  vlm:\n    models:\n      m:\n        model: fastvlm-0.5b\n        runtime: onnx\n"
    settings = load_settings(write(tmp_path, text))
    assert settings.cache_dir == Path("~/.cache/lumen").expanduser()  # absent cache_dir: the seed's default
    assert settings.backend.device == "auto"
    assert settings.limits.default_max_new_tokens == 512
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 50051)
    assert not settings.server.mdns.enabled


def test_short_form_server_and_precision_alias(tmp_path: Path) -> None:
    text = (
        "server: {port: 6000, host: 127.0.0.1}\n"
        "services:\n  vlm:\n    models:\n      m: {model: fastvlm-0.5b, runtime: onnx, precision: q4fp16}\n"
        "    backend_settings: {device: null, onnx_providers: [CPUExecutionProvider]}\n"
    )
    settings = load_settings(write(tmp_path, text))
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 6000)
    assert settings.model.precision == "q4f16"
    assert settings.backend.device == "auto"
    assert settings.backend.providers == ["CPUExecutionProvider"]


def test_vision_precision_is_its_own_option(tmp_path: Path) -> None:
    model = "services:\n  vlm:\n    models:\n      m: {model: x, runtime: onnx, precision: q4}\n"
    assert load_settings(write(tmp_path, model)).model.vision_precision is None  # the model's precision
    settings = load_settings(write(tmp_path, model + "    vlm_settings: {vision_precision: int8}\n"))
    assert (settings.model.precision, settings.model.vision_precision) == ("q4", "int8")
    with pytest.raises(ConfigError, match=r"services\.vlm\.vlm_settings\.vision_precision: unknown precision 'int9'"):
        load_settings(write(tmp_path, model + "    vlm_settings: {vision_precision: int9}\n"))


def test_prefill_precision_is_its_own_option(tmp_path: Path) -> None:
    model = "services:\n  vlm:\n    models:\n      m: {model: x, runtime: onnx, precision: q4}\n"
    assert load_settings(write(tmp_path, model)).model.prefill_precision is None  # the decoder alone
    settings = load_settings(write(tmp_path, model + "    vlm_settings: {prefill_precision: int8}\n"))
    assert (settings.model.precision, settings.model.prefill_precision) == ("q4", "int8")
    with pytest.raises(ConfigError, match=r"services\.vlm\.vlm_settings\.prefill_precision: unknown precision 'q5'"):
        load_settings(write(tmp_path, model + "    vlm_settings: {prefill_precision: q5}\n"))


def test_tilde_and_relative_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    model = "services:\n  vlm:\n    models:\n      m: {model: x, runtime: onnx}\n"
    settings = load_settings(write(tmp_path, 'cache_dir: "~/lumen"\n' + model))
    assert settings.cache_dir == tmp_path / "home" / "lumen"
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    settings = load_settings(write(config_dir, "cache_dir: cache\n" + model))
    assert settings.cache_dir == config_dir.resolve() / "cache"  # relative to the config file, not the cwd
    monkeypatch.chdir(config_dir)
    assert load_settings("~/../conf/config.yaml").cache_dir == config_dir.resolve() / "cache"


def test_max_new_tokens_above_default_bound_raises_the_bound(tmp_path: Path) -> None:
    data = full_config(tmp_path)
    data["services"]["vlm"]["backend_settings"]["max_new_tokens"] = 4096
    assert settings_from_mapping(data).limits.max_new_tokens == 4096
    data["services"]["vlm"]["backend_settings"]["max_new_tokens_limit"] = 8192
    limits = settings_from_mapping(data).limits
    assert (limits.default_max_new_tokens, limits.max_new_tokens) == (4096, 8192)
    data["services"]["vlm"]["backend_settings"]["max_response_format_chars"] = 1000
    assert settings_from_mapping(data).limits.max_response_format_chars == 1000


def test_hub_service_config_from_model_and_dict(tmp_path: Path) -> None:
    block = full_config(tmp_path)["services"]["vlm"]
    settings = settings_from_service_config(dict(block), cache_dir="~/lumen-cache")
    assert settings.cache_dir == Path("~/lumen-cache").expanduser()
    assert settings.model.model == "onnx-community/FastVLM-0.5B-ONNX"
    assert settings.limits.default_max_new_tokens == 256  # VLM keys taken out of backend_settings
    assert settings.admission.max_concurrency == 2

    lumen_block = dict(block, backend_settings={"device": "cpu"}, vlm_settings={"max_new_tokens": 64})
    assert settings_from_service_config(lumen_block, tmp_path).limits.default_max_new_tokens == 64
    model = Services.model_validate(dict(block, backend_settings={"device": "cuda"}))
    settings = settings_from_service_config(model, tmp_path)
    assert (settings.backend.device, settings.model.precision) == ("cuda", "int8")
    assert settings.cache_dir == tmp_path


# --------------------------------------------------------------------------- errors

SHORT = "services:\n  vlm:\n    models:\n      fastvlm: {model: fastvlm-0.5b, runtime: onnx}\n"


def full_with(tmp_path: Path, edit) -> str:  # type: ignore[no-untyped-def]
    data = full_config(tmp_path)
    edit(data)
    return yaml.safe_dump(data)


def vlm(data: dict) -> dict:
    return data["services"]["vlm"]


def backend(data: dict) -> dict:
    return vlm(data)["backend_settings"]


def rename_to_clip(data: dict) -> dict:
    block = data["services"].pop("vlm")
    block["backend_settings"] = {"device": "cpu"}  # clip's backend_settings has no VLM keys
    return block


def model_entry(data: dict) -> dict:
    return vlm(data)["models"]["fastvlm"]


BAD_CONFIGS = [
    ("bad-yaml", "services: [unclosed\n", "not valid YAML"),
    ("not-a-mapping", "- vlm\n- clip\n", "top level must be a mapping"),
    ("empty", "", "is empty"),
    ("short-no-services", "cache_dir: /tmp/x\n", "services: required"),
    ("short-missing-vlm", "services:\n  vlm: null\n", "services.vlm: missing"),
    ("short-other-service", SHORT + "  clip: {}\n", "services.clip: the short form configures only services.vlm"),
    ("short-unknown-top-key", "cach_dir: /x\n" + SHORT, "cach_dir: unknown key"),
    ("short-empty-cache-dir", 'cache_dir: ""\n' + SHORT, "cache_dir: must be a non-empty path"),
    ("short-runtime-missing", "services:\n  vlm:\n    models:\n      m: {model: x}\n", "services.vlm.models.m.runtime"),
    ("full-missing-vlm", lambda d: d["services"].update(clip=rename_to_clip(d)), "services.vlm: missing (services de"),
    ("no-models", lambda d: vlm(d).update(models={}), "services.vlm.models: no model configured"),
    (
        "two-models",
        lambda d: vlm(d)["models"].update(other={"model": "x", "runtime": "onnx"}),
        "services.vlm.models: a VLM service serves exactly one model, found 2: fastvlm, other",
    ),
    (
        "runtime-torch",
        lambda d: model_entry(d).update(runtime="torch"),
        "services.vlm.models.fastvlm.runtime: 'torch' is not supported; use 'onnx'",
    ),
    ("runtime-unknown", lambda d: model_entry(d).update(runtime="tf"), "services.vlm.models.fastvlm.runtime: Input"),
    ("precision-unknown", lambda d: model_entry(d).update(precision="fp8"), "services.vlm.models.fastvlm.precision"),
    ("precision-typo-key", lambda d: model_entry(d).update(precison="int8"), "services.vlm.models.fastvlm.precison"),
    ("empty-model", lambda d: model_entry(d).update(model=" "), "services.vlm.models.fastvlm.model"),
    (
        "negative-max-new-tokens",
        lambda d: backend(d).update(max_new_tokens=-1),
        "services.vlm.backend_settings.max_new_tokens: Input should be greater than 0",
    ),
    (
        "max-new-tokens-above-limit",
        lambda d: backend(d).update(max_new_tokens=4096, max_new_tokens_limit=1024),
        "services.vlm.backend_settings.max_new_tokens: 4096 exceeds max_new_tokens_limit",
    ),
    (
        "non-integer-max-concurrency",
        lambda d: backend(d).update(max_concurrency="two"),
        "services.vlm.backend_settings.max_concurrency: Input should be a valid integer",
    ),
    ("fractional-max-concurrency", lambda d: backend(d).update(max_concurrency=2.5), "max_concurrency"),
    ("bool-max-queue", lambda d: backend(d).update(max_queue=True), "services.vlm.backend_settings.max_queue"),
    (
        "negative-feature-cache",
        lambda d: backend(d).update(feature_cache_bytes=-1),
        "services.vlm.backend_settings.feature_cache_bytes: Input should be greater than or equal to 0",
    ),
    (
        "text-prefix-cache",
        lambda d: vlm(d).update(vlm_settings={"prefix_cache_bytes": "256M"}),
        "services.vlm.vlm_settings.prefix_cache_bytes: Input should be a valid integer",
    ),
    ("zero-queue-timeout", lambda d: backend(d).update(queue_timeout_s=0), "services.vlm.backend_settings.queue_t"),
    ("unknown-backend-key", lambda d: backend(d).update(colour="red"), "services.vlm.backend_settings.colour: unknown"),
    ("bad-batch-size", lambda d: backend(d).update(batch_size=0), "services.vlm.backend_settings.batch_size"),
    ("providers-not-list", lambda d: backend(d).update(onnx_providers="CPU"), "backend_settings.onnx_providers"),
    (
        "key-in-both-places",
        lambda d: vlm(d).update(vlm_settings={"max_concurrency": 4}),
        "services.vlm.vlm_settings.max_concurrency: also set at services.vlm.backend_settings.max_concurrency",
    ),
    ("bad-vlm-settings-key", lambda d: vlm(d).update(vlm_settings={"nope": 1}), "services.vlm.vlm_settings.nope"),
    ("unknown-service-key", lambda d: vlm(d).update(backend_setting={}), "services.vlm.backend_setting: unknown key"),
    ("port-out-of-range", lambda d: d["server"].update(port=70000), "server.port: Input should be less than"),
    ("server-typo", lambda d: d["server"].update(prot=1), "server.prot: unknown key"),
    ("mdns-bad-name", lambda d: d["server"]["mdns"].update(service_name="Lumen VLM"), "server.mdns.service_name"),
    ("missing-cache-dir", lambda d: d["metadata"].pop("cache_dir"), "metadata.cache_dir: required key is missing"),
    ("bad-version", lambda d: d["metadata"].update(version="1"), "metadata.version"),
    ("bad-region", lambda d: d["metadata"].update(region="mars"), "metadata.region"),
    ("deployment-no-service", lambda d: d["deployment"].pop("service"), "deployment.service: required key"),
    ("deployment-other", lambda d: d["deployment"].update(service="clip"), "deployment.service: 'clip' is deployed"),
    ("service-disabled", lambda d: vlm(d).update(enabled=False), "services.vlm.enabled"),
    ("missing-import-info", lambda d: vlm(d).pop("import_info"), "services.vlm.import_info: required key"),
    ("unknown-top-key", lambda d: d.update(extra={}), "extra: unknown key"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_key(tmp_path: Path, text, expected: str) -> None:  # type: ignore[no-untyped-def]
    if callable(text):
        text = full_with(tmp_path, text)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert expected in message
    assert str(path) in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not a file"):
        load_settings(tmp_path)


def test_mapping_errors_without_a_file() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        settings_from_mapping(["not", "a", "mapping"])
    with pytest.raises(ConfigError, match=re.escape("services.vlm: expected a mapping")):
        settings_from_service_config("vlm", cache_dir="/tmp")


def test_deployment_mode_errors_point_at_the_intended_member(tmp_path: Path) -> None:
    """A hub deployment without services: only the hub member's complaint, not the single one's."""
    data = full_config(tmp_path)
    data["deployment"] = {"mode": "hub"}
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data)
    assert str(caught.value) == "deployment.services: required key is missing"


def test_onnx_providers_must_be_names_or_pairs(tmp_path: Path) -> None:
    def with_providers(providers: object) -> dict:
        return {
            "cache_dir": str(tmp_path),
            "services": {
                "vlm": {
                    "models": {"m": {"model": str(tmp_path), "runtime": "onnx"}},
                    "backend_settings": {"onnx_providers": providers},
                }
            },
        }

    ok = settings_from_mapping(with_providers(["CUDAExecutionProvider", ["CPUExecutionProvider", {"a": 1}]]))
    assert ok.backend.providers == ["CUDAExecutionProvider", ["CPUExecutionProvider", {"a": 1}]]
    with pytest.raises(ConfigError, match=r"onnx_providers\[0\]"):
        settings_from_mapping(with_providers([5]))


def test_the_example_config_loads() -> None:
    settings = load_settings(Path(__file__).resolve().parents[2] / "config.example.yaml")
    assert settings.model.model == "fastvlm-0.5b"
    assert settings.model.precision == "q4"
    assert settings.server.port == 50051
