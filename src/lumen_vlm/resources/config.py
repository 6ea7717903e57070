"""Read the VLM service's YAML configuration into `VLMSettings`.

Two forms are accepted; the form is told by the presence of ``metadata`` or ``deployment``:

* **The full Lumen config** (``metadata`` / ``deployment`` / ``server`` / ``services``), the one
  every Lumen service and the Lumen hub read. It is validated by lumen-resources' `LumenConfig`,
  so a file lumen-resources accepts is accepted here and its rules (port range, name patterns,
  runtime enum, ...) are not restated.
* **The short form** of the seed README: top-level ``cache_dir`` (default ``~/.cache/lumen``),
  optional ``server: {port, host, mdns}`` and ``services.vlm`` with ``models``,
  ``backend_settings`` and ``vlm_settings``. It is expanded into a full config (metadata,
  single-service deployment, package and import_info filled in) and then goes through exactly
  the same validation, so both forms report errors by the same key paths.

The VLM's own keys (`VLM_KEYS`: token, payload and image limits, admission, cache budgets,
threads) need a home that lumen-resources' schema does not have: its ``BackendSettings`` forbids
unknown keys, yet the seed puts ``max_new_tokens`` there. They are accepted in two places:

* ``services.vlm.backend_settings`` (seed compatibility): they are taken out before
  lumen-resources validates the rest, so its strictness still catches typos in its own keys;
* ``services.vlm.vlm_settings``: a block of its own, which lumen-resources' ``Services`` model and
  JSON schema let through untouched. Prefer it in a file the Lumen hub also validates: the hub
  would reject VLM keys inside ``backend_settings``.

A key set in both places is an error, since which one wins would not be obvious. Unknown keys in
the VLM's own service block, its model entry and ``server`` are errors too (lumen-resources
ignores them there), because a misspelt ``precison`` or ``prot`` would otherwise silently run
something else than asked.

Choices: a service serves exactly one model, so more than one alias under ``models`` is an
error naming them (picking one silently would hide the others); only the ``onnx`` runtime exists
here; precision is one of `model_files.PRECISIONS` (default fp32, ``q4fp16`` accepted as
lumen-resources' spelling of ``q4f16``); ``device`` is passed through for the backend to check.
``max_new_tokens`` is, as in the seed, what a request gets when it does not ask; the upper bound
a request may ask for is ``max_new_tokens_limit`` (raised to ``max_new_tokens`` when only that
is given). Relative ``cache_dir`` paths are taken from the config file's directory.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import yaml
from lumen_resources.lumen_config import BackendSettings as LumenBackendSettings
from lumen_resources.lumen_config import LumenConfig, Mdns, ModelConfig, Server, Services
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .exceptions import ConfigError, ModelFilesError
from .model_files import canonical_precision
from .settings import (
    AdmissionSettings,
    BackendSettings,
    CacheSettings,
    GenerationLimits,
    HttpSettings,
    MdnsSettings,
    ModelSettings,
    ServerSettings,
    VLMSettings,
)

DEFAULT_CACHE_DIR = "~/.cache/lumen"
SUPPORTED_RUNTIMES = ("onnx",)
# What the short form stands for in the full one; also what loader.py hands lumen-resources.
LUMEN_PACKAGE = "lumen_vlm"
LUMEN_IMPORT_INFO = {
    "registry_class": "lumen_vlm.fastvlm.GeneralFastVLMService",
    "add_to_server": "lumen_vlm.proto.ml_service_pb2_grpc.add_InferenceServicer_to_server",
}

_PositiveInt = Annotated[int, Field(strict=True, gt=0)]  # strict: no "2", 2.0 or true for a count
_NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
_PositiveFloat = Annotated[float, Field(strict=True, gt=0)]
_NonNegativeFloat = Annotated[float, Field(strict=True, ge=0)]


class VLMOptions(BaseModel):
    """The VLM's own keys, in ``backend_settings`` or ``vlm_settings``; unset ones keep the defaults."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: _PositiveInt | None = None  # a request's default
    max_new_tokens_limit: _PositiveInt | None = None  # the most a request may ask for
    max_payload_bytes: _PositiveInt | None = None
    max_image_pixels: _PositiveInt | None = None
    max_stop_sequences: _NonNegativeInt | None = None
    max_stop_sequence_chars: _PositiveInt | None = None
    max_messages_chars: _PositiveInt | None = None
    max_response_format_chars: _PositiveInt | None = None
    max_concurrency: _PositiveInt | None = None  # batch slots; unset: what kv_cache_tokens allows, at least 4
    kv_cache_tokens: _PositiveInt | None = None
    prefill_chunk_tokens: _PositiveInt | None = None
    max_queue: _NonNegativeInt | None = None  # 0: no waiting, busy means UNAVAILABLE at once
    queue_timeout_s: _PositiveFloat | None = None
    shutdown_grace_s: _NonNegativeFloat | None = None
    max_streams: _PositiveInt | None = None
    stream_idle_timeout_s: _PositiveFloat | None = None
    upload_idle_timeout_s: _PositiveFloat | None = None
    intra_op_threads: _NonNegativeInt | None = None  # 0: ONNX Runtime's default
    feature_cache_bytes: _NonNegativeInt | None = None  # 0: no image-feature cache
    prefix_cache_bytes: _NonNegativeInt | None = None  # 0: no prompt-prefix KV cache
    vision_precision: str | None = None  # the vision graph's precision; unset: the model's
    prefill_precision: str | None = None  # a second decoder graph's, for prompts; unset: the decoder alone


VLM_KEYS = tuple(VLMOptions.model_fields)


_Port = Annotated[int, Field(strict=True, ge=0, le=65535)]
_Name = Annotated[str, Field(strict=True, min_length=1)]


class HttpOptions(BaseModel):
    """``server.http``: the HTTP front door. lumen-resources' ``Server`` ignores keys it does not
    know, so this block (and ``server.api_key``) is read here, from the raw config."""

    model_config = ConfigDict(extra="forbid")

    host: _Name | None = None
    port: _Port = HttpSettings.port
    model_aliases: list[_Name] = []
    allowed_image_hosts: list[_Name] = []
    image_fetch_timeout_s: _PositiveFloat = HttpSettings.image_fetch_timeout_s
    max_body_bytes: _PositiveInt | None = None


API_KEY_ENV = "LUMEN_VLM_API_KEY"  # wins over server.api_key, so a key need not be written in the file
# Option key -> GenerationLimits field; the seed's max_new_tokens is the per-request default.
_LIMIT_FIELDS = {
    "max_new_tokens": "default_max_new_tokens",
    "max_new_tokens_limit": "max_new_tokens",
    "max_payload_bytes": "max_payload_bytes",
    "max_image_pixels": "max_image_pixels",
    "max_stop_sequences": "max_stop_sequences",
    "max_stop_sequence_chars": "max_stop_sequence_chars",
    "max_messages_chars": "max_messages_chars",
    "max_response_format_chars": "max_response_format_chars",
}
_ADMISSION_FIELDS = (
    "max_concurrency",
    "kv_cache_tokens",
    "prefill_chunk_tokens",
    "max_queue",
    "queue_timeout_s",
    "shutdown_grace_s",
    "max_streams",
    "stream_idle_timeout_s",
    "upload_idle_timeout_s",
)

_BACKEND_FIELDS = ("intra_op_threads",)
_CACHE_FIELDS = ("feature_cache_bytes", "prefix_cache_bytes")

_SERVICE_KEYS = (*Services.model_fields, "vlm_settings")
_SHORT_TOP_KEYS = ("cache_dir", "server", "services")
_SHORT_SERVICE_KEYS = ("models", "backend_settings", "vlm_settings")
_SERVER_KEYS = (*Server.model_fields, "http", "api_key")  # the last two are ours: see HttpOptions
_MDNS_KEYS = tuple(Mdns.model_fields)
_HINTS = {
    "prefer_fp16": "choose the model's precision instead: models.<alias>.precision: fp16",
    "import": "lumen-resources names this block import_info",
}


# --------------------------------------------------------------------------- public API


def load_settings(path: Path | str, service: str = "vlm") -> VLMSettings:
    """Read and validate a config file; every problem is a ConfigError naming the file and key."""
    path = Path(path).expanduser()
    data = _read_yaml(path)
    try:
        return settings_from_mapping(data, base_dir=path.parent.resolve(), service=service)
    except ConfigError as exc:
        raise ConfigError(_in_file(path, str(exc))) from None


def settings_from_mapping(data: Any, base_dir: Path | None = None, service: str = "vlm") -> VLMSettings:
    """Validate an already parsed config of either form; `base_dir` anchors relative paths."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"the config must be a mapping of keys, got {type(data).__name__}")
    if "metadata" in data or "deployment" in data:
        return _from_full_config(data, base_dir, service)
    return _from_full_config(_expand_short_form(data, service), base_dir, service)


def settings_from_service_config(service_config: Any, cache_dir: str | Path, service: str = "vlm") -> VLMSettings:
    """Settings for the Lumen hub, from its ``services.vlm`` entry (a `Services` model or a dict).

    The hub runs the server, so server settings stay at their defaults. A `Services` model has
    already dropped unknown blocks, so ``vlm_settings`` only arrives when the hub passes a dict.
    """
    if isinstance(service_config, BaseModel):
        block: Any = service_config.model_dump(mode="json")
    elif isinstance(service_config, Mapping):
        block = copy.deepcopy(dict(service_config))
    else:
        raise ConfigError(f"services.{service}: expected a mapping, got {type(service_config).__name__}")
    prefix = f"services.{service}"
    raw_options = _take_vlm_options(block, prefix)
    validated = _validate(Services, block, prefix)
    return _build_settings(
        validated,
        _merge_options(raw_options),
        service=service,
        cache_dir=_cache_dir(str(cache_dir), "cache_dir", None),
    )


# --------------------------------------------------------------------------- reading the file


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so YAML errors name the file
            data = yaml.safe_load(stream)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{path} is empty")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got a {type(data).__name__}")
    return data


def _in_file(path: Path, message: str) -> str:
    if "\n" not in message:
        return f"{path}: {message}"
    return f"{path}:\n  " + message.replace("\n", "\n  ")


# --------------------------------------------------------------------------- the two forms


def _expand_short_form(data: Mapping[str, Any], service: str) -> dict[str, Any]:
    """The seed's short form as the full config it stands for (validated later, like any other)."""
    _check_keys(data, _SHORT_TOP_KEYS, "")
    cache_dir = data.get("cache_dir", DEFAULT_CACHE_DIR)
    if not isinstance(cache_dir, str) or not cache_dir.strip():
        raise ConfigError(f"cache_dir: must be a non-empty path, got {cache_dir!r}")
    services = data.get("services")
    if not isinstance(services, Mapping):
        raise ConfigError(f"services: required, a mapping holding services.{service}")
    others = [str(name) for name in services if name != service]
    if others:
        raise ConfigError(
            f"services.{others[0]}: the short form configures only services.{service}; "
            "use the full Lumen config (metadata/deployment/server/services) for several services"
        )
    block = services.get(service)
    if not isinstance(block, Mapping):
        raise ConfigError(f"services.{service}: missing or not a mapping")
    _check_keys(block, _SHORT_SERVICE_KEYS, f"services.{service}")
    server = data.get("server") or {}
    if not isinstance(server, Mapping):
        raise ConfigError("server: must be a mapping with port and host")
    return single_service_config(service, cache_dir, "other", {"port": ServerSettings.port, **server}, block)


def single_service_config(
    service: str, cache_dir: Any, region: str, server: Mapping[str, Any], entry: Mapping[str, Any]
) -> dict[str, Any]:
    """A full Lumen config, as a dict, deploying this package as `service` alone; `entry` holds
    the service entry's own keys (models, backend_settings, ...)."""
    return {
        "metadata": {"version": "1.0.0", "region": region, "cache_dir": cache_dir},
        "deployment": {"mode": "single", "service": service},
        "server": dict(server),
        "services": {
            service: {"enabled": True, "package": LUMEN_PACKAGE, "import_info": dict(LUMEN_IMPORT_INFO), **entry}
        },
    }


def _from_full_config(data: Mapping[str, Any], base_dir: Path | None, service: str) -> VLMSettings:
    data = copy.deepcopy(dict(data))  # the VLM keys are taken out below; the caller's dict stays whole
    raw_options = _take_service_extras(data, service)
    _check_server_keys(data.get("server"))
    config = _validate(LumenConfig, data)
    validated = config.services.get(service)
    if validated is None:
        found = ", ".join(config.services) or "none"
        raise ConfigError(f"services.{service}: missing (services defined: {found})")
    if not validated.enabled:
        raise ConfigError(f"services.{service}.enabled: the {service} service is disabled in this config")
    if config.deployment.mode == "single" and config.deployment.service != service:
        raise ConfigError(
            f"deployment.service: {config.deployment.service!r} is deployed, but this is the {service!r} service"
        )
    return _build_settings(
        validated,
        _merge_options(raw_options),
        service=service,
        cache_dir=_cache_dir(config.metadata.cache_dir, "metadata.cache_dir", base_dir),
        region=config.metadata.region.value,
        server=_server_settings(config.server, data.get("server")),
        config_dir=base_dir,
    )


def _take_service_extras(data: dict[str, Any], service: str) -> list[tuple[str, Any]]:
    """Take the VLM keys out of services.<service> so lumen-resources validates only its own."""
    services = data.get("services")
    block = services.get(service) if isinstance(services, dict) else None
    if not isinstance(block, dict):
        return []  # nothing to take; validation reports what is missing
    return _take_vlm_options(block, f"services.{service}")


def _take_vlm_options(block: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """Check the service block's keys and remove the VLM options; returns (origin, raw mapping) pairs."""
    _check_keys(block, _SERVICE_KEYS, prefix)
    _check_model_keys(block.get("models"), f"{prefix}.models")
    found: list[tuple[str, Any]] = []
    backend = block.get("backend_settings")
    if isinstance(backend, dict):
        found.append((f"{prefix}.backend_settings", {k: backend.pop(k) for k in VLM_KEYS if k in backend}))
        _check_keys(backend, (*LumenBackendSettings.model_fields, *VLM_KEYS), f"{prefix}.backend_settings")
    if "vlm_settings" in block:
        found.append((f"{prefix}.vlm_settings", block.pop("vlm_settings")))
    return found


def _check_model_keys(models: Any, prefix: str) -> None:
    if not isinstance(models, Mapping):
        return
    for alias, entry in models.items():
        if isinstance(entry, Mapping):
            _check_keys(entry, tuple(ModelConfig.model_fields), f"{prefix}.{alias}")


def _check_server_keys(server: Any) -> None:
    if not isinstance(server, Mapping):
        return
    _check_keys(server, _SERVER_KEYS, "server")
    if isinstance(server.get("mdns"), Mapping):
        _check_keys(server["mdns"], _MDNS_KEYS, "server.mdns")


# --------------------------------------------------------------------------- validation helpers


def _check_keys(mapping: Mapping[Any, Any], known: Iterable[str], prefix: str) -> None:
    known = tuple(known)
    for key in mapping:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else str(key)
            hint = _HINTS.get(str(key), f"known keys: {', '.join(known)}")
            raise ConfigError(f"{path}: unknown key ({hint})")


def _validate(model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc.errors(), data, prefix)) from None


def _describe_errors(errors: list[Any], data: Any, prefix: str) -> str:
    """pydantic's errors as 'key.path: problem' lines, one per distinct problem."""
    located = [(_key_path(error["loc"], data), error) for error in errors]
    # In a union (deployment: single | hub) a member whose literal did not match is not the one
    # the user meant; its complaints would only confuse, unless no member matched at all.
    wrong = {member for (_, member), error in located if member and error["type"] == "literal_error"}
    if any(member not in wrong for (_, member), _ in located):
        located = [(loc, error) for loc, error in located if loc[1] not in wrong]
    lines: list[str] = []
    for (parts, _), error in located:
        path = ".".join(filter(None, [prefix, *parts])) or "config"
        line = f"{path}: {_problem(error)}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def _key_path(loc: tuple[Any, ...], data: Any) -> tuple[list[str], tuple[Any, ...] | None]:
    """The error's key path in the user's data, and the union member it came from if any.

    pydantic puts a union member's class name in the location (deployment.Deployment1.mode);
    it is told from a key by not being one in the data.
    """
    parts: list[str] = []
    member: tuple[Any, ...] | None = None
    node = data
    for index, part in enumerate(loc):
        is_key = isinstance(node, Mapping) and part in node
        is_item = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not (is_key or is_item) and isinstance(part, str) and part[:1].isupper():
            member = loc[: index + 1]
            continue
        node = node[part] if is_key or is_item else None
        parts.append(str(part))
    return parts, member


def _problem(error: Mapping[str, Any]) -> str:
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "extra_forbidden":
        return "unknown key"
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{error['msg']} (got {shown})"


# --------------------------------------------------------------------------- building the settings


def _merge_options(sources: list[tuple[str, Any]]) -> dict[str, tuple[Any, str]]:
    """The VLM keys set in either place: key -> (value, where it was set)."""
    merged: dict[str, tuple[Any, str]] = {}
    for origin, raw in sources:
        if raw is None:  # an empty vlm_settings block
            continue
        options = _validate(VLMOptions, raw, origin)
        for key in options.model_fields_set:
            value = getattr(options, key)
            if value is None:
                continue
            if key in merged:
                raise ConfigError(f"{origin}.{key}: also set at {merged[key][1]}; set it in one place")
            merged[key] = (value, f"{origin}.{key}")
    return merged


def _providers(value: list[Any] | None, where: str) -> list[Any] | None:
    """ONNX Runtime providers as names or [name, {options}] pairs; availability is the backend's to check."""
    for index, entry in enumerate(value or []):
        pair = isinstance(entry, list | tuple) and len(entry) == 2
        if not (isinstance(entry, str) or (pair and isinstance(entry[0], str) and isinstance(entry[1], Mapping))):
            raise ConfigError(f"{where}[{index}]: {entry!r} is neither a provider name nor [name, {{options}}]")
    return value


def _build_settings(
    service_config: Services,
    options: dict[str, tuple[Any, str]],
    *,
    service: str,
    cache_dir: Path,
    region: str = "other",
    server: ServerSettings | None = None,
    config_dir: Path | None = None,
) -> VLMSettings:
    backend = service_config.backend_settings or LumenBackendSettings()
    return VLMSettings(
        cache_dir=cache_dir,
        model=_model_settings(
            service_config.models,
            f"services.{service}.models",
            options.get("vision_precision"),
            options.get("prefill_precision"),
        ),
        backend=BackendSettings(
            device=backend.device or BackendSettings.device,  # null means auto-detect, as in lumen-resources
            providers=_providers(backend.onnx_providers, f"services.{service}.backend_settings.onnx_providers"),
            **{k: options[k][0] for k in _BACKEND_FIELDS if k in options},
        ),
        limits=_limits(options),
        admission=AdmissionSettings(**{k: options[k][0] for k in _ADMISSION_FIELDS if k in options}),
        caches=CacheSettings(**{k: options[k][0] for k in _CACHE_FIELDS if k in options}),
        server=server or ServerSettings(),
        service_name=service,
        region=region,
        config_dir=config_dir,
    )


def _model_settings(
    models: Mapping[str, ModelConfig],
    prefix: str,
    vision_precision: tuple[str, str] | None = None,
    prefill_precision: tuple[str, str] | None = None,
) -> ModelSettings:
    """The one model entry, and the vision and prefill precision options as (value, key) where set."""
    if not models:
        raise ConfigError(
            f"{prefix}: no model configured; add one, e.g. {prefix}.fastvlm: {{model: ..., runtime: onnx}}"
        )
    if len(models) > 1:
        raise ConfigError(
            f"{prefix}: a VLM service serves exactly one model, found {len(models)}: {', '.join(models)}; keep one"
        )
    alias, entry = next(iter(models.items()))
    path = f"{prefix}.{alias}"
    runtime = entry.runtime.value
    if runtime not in SUPPORTED_RUNTIMES:
        raise ConfigError(f"{path}.runtime: {runtime!r} is not supported; use 'onnx'")
    if not entry.model.strip():
        raise ConfigError(f"{path}.model: must name a model directory, Lumen model or Hugging Face repo")
    precision = _precision(entry.precision, f"{path}.precision")
    return ModelSettings(
        alias=alias,
        model=entry.model.strip(),
        runtime=runtime,
        precision=precision,
        vision_precision=_precision(*vision_precision) if vision_precision else None,
        prefill_precision=_precision(*prefill_precision) if prefill_precision else None,
    )


def _precision(value: str | None, path: str) -> str:
    """The configured precision in our spelling (`canonical_precision`); ModelSettings' (fp32) when unset."""
    if value is None:
        return ModelSettings.precision
    try:
        return canonical_precision(value)
    except ModelFilesError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def with_precision(settings: VLMSettings, precision: str) -> VLMSettings:
    """`settings` with the model's precision replaced (the CLI's --precision), checked as the config's is."""
    checked = _precision(precision, f"{settings.model_key}.precision")
    return replace(settings, model=replace(settings.model, precision=checked))


def _limits(options: dict[str, tuple[Any, str]]) -> GenerationLimits:
    values = {field: options[key][0] for key, field in _LIMIT_FIELDS.items() if key in options}
    default = values.get("default_max_new_tokens", GenerationLimits.default_max_new_tokens)
    if "max_new_tokens_limit" not in options:
        # A configured default must be askable: the bound rises to meet it when not set itself.
        values["max_new_tokens"] = max(GenerationLimits.max_new_tokens, default)
    elif default > options["max_new_tokens_limit"][0]:
        where = options["max_new_tokens"][1] if "max_new_tokens" in options else options["max_new_tokens_limit"][1]
        raise ConfigError(f"{where}: {default} exceeds max_new_tokens_limit ({options['max_new_tokens_limit'][0]})")
    return GenerationLimits(**values)


def _server_settings(server: Server, raw: Any) -> ServerSettings:
    """`raw`: the config's server block as written, for the keys lumen-resources does not keep."""
    raw = raw if isinstance(raw, Mapping) else {}
    mdns = server.mdns
    return ServerSettings(
        http=_http_settings(raw.get("http", None), "http" in raw),
        api_key=_api_key(raw.get("api_key")),
        host=server.host or ServerSettings.host,
        port=server.port,
        mdns=MdnsSettings(
            enabled=bool(mdns and mdns.enabled),
            service_name=(mdns and mdns.service_name) or MdnsSettings.service_name,
        ),
    )


def _http_settings(raw: Any, present: bool) -> HttpSettings | None:
    """``server.http`` (an empty block means every default); None when the config has none."""
    if not present:
        return None
    options = _validate(HttpOptions, raw or {}, "server.http")
    return HttpSettings(
        host=options.host,
        port=options.port,
        model_aliases=tuple(options.model_aliases),
        allowed_image_hosts=tuple(host.lower() for host in options.allowed_image_hosts),
        image_fetch_timeout_s=options.image_fetch_timeout_s,
        max_body_bytes=options.max_body_bytes,
    )


def _api_key(configured: Any) -> str | None:
    """The API key: the environment's LUMEN_VLM_API_KEY, else server.api_key; None (no key) when
    neither is set (an empty one counts as unset)."""
    value = os.environ.get(API_KEY_ENV)
    where = API_KEY_ENV
    if not value:
        value, where = configured, "server.api_key"
    if value is None:
        return None
    if not isinstance(value, str) or value != value.strip() or any(not " " < ch < "\x7f" for ch in value):
        raise ConfigError(f"{where}: must be printable ASCII without spaces (it is sent in an HTTP header)")
    return value or None


def _cache_dir(value: str, path: str, base_dir: Path | None) -> Path:
    if not value.strip():
        raise ConfigError(f"{path}: must not be empty")
    cache_dir = Path(value).expanduser()
    if not cache_dir.is_absolute():
        cache_dir = (base_dir or Path.cwd()) / cache_dir
    return cache_dir
