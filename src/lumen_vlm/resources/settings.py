"""The settings one VLM service runs with, after the YAML config is validated and resolved.

`resources/config.py` builds these from either config form; the service, server and CLI
only ever see these typed records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSettings:
    """Which model to load and how."""

    alias: str  # the key under services.vlm.models
    model: str  # a local directory, a Lumen model name, or a Hugging Face repo id
    runtime: str = "onnx"
    precision: str = "fp32"
    # The vision encoder's own precision (tools/quantize_vision.py writes an int8 one); None: `precision`.
    vision_precision: str | None = None
    # A second decoder graph that prompts run through (e.g. int8 beside a q4 decoder: int8 matmuls
    # prefill faster, q4 ones decode faster); None: the decoder runs both.
    prefill_precision: str | None = None


@dataclass(frozen=True)
class BackendSettings:
    device: str = "auto"  # auto, cpu, cuda, mps/coreml, directml, openvino, tensorrt
    providers: list[Any] | None = None  # names or [name, {options}] pairs; wins over device
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)


@dataclass(frozen=True)
class GenerationLimits:
    """Defaults and bounds for requests; every one is enforced and reported in capabilities."""

    default_max_new_tokens: int = 512
    max_new_tokens: int = 2048  # upper bound a request may ask for (also clamped to the context)
    max_payload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_stop_sequences: int = 8
    max_stop_sequence_chars: int = 256
    max_messages_chars: int = 200_000
    # A response_format's schema or pattern; OpenAI allows some 120 000 characters of strings in a
    # schema, far more than a photo app's label schema (about 500) needs.
    max_response_format_chars: int = 32_768

    @property
    def request_default_max_new_tokens(self) -> int:
        """What a request that does not ask gets: the default, never past the bound."""
        return min(self.default_max_new_tokens, self.max_new_tokens)


@dataclass(frozen=True)
class AdmissionSettings:
    # Sequences decoded together in one batch. None: what kv_cache_tokens allows for requests
    # of the largest size served, at least 4 (`engine.batch_slots`).
    max_concurrency: int | None = None
    # The KV cache of every batch slot together, in tokens (positions); each slot gets an equal
    # share, at most the model's context. FastVLM-0.5B's fp32 KV is 24 KiB a token: 384 MiB.
    kv_cache_tokens: int = 16384
    # A new prompt is prefilled this many tokens per step between the running streams' steps.
    prefill_chunk_tokens: int = 256
    max_queue: int = 16  # requests waiting for a slot; beyond it UNAVAILABLE at once
    queue_timeout_s: float = 60.0  # longest wait for a slot before UNAVAILABLE
    shutdown_grace_s: float = 20.0  # in-flight generations may finish within this on SIGTERM
    # The gRPC front door: open Infer streams at once (beyond it RESOURCE_EXHAUSTED; health and
    # capabilities never count), and how long a stream or a chunked upload may stay silent.
    max_streams: int = 256
    stream_idle_timeout_s: float = 300.0  # no request in flight and nothing received: UNAVAILABLE
    upload_idle_timeout_s: float = 30.0  # an unfinished chunked upload with no new chunk is dropped


@dataclass(frozen=True)
class CacheSettings:
    """The model room's two caches of past work, each bounded in bytes (0 turns it off)."""

    # A second question about the same photo skips the vision encoder: its features, kept
    # (FastVLM-0.5B's are 256 x 896 float32, 0.9 MiB a photo).
    feature_cache_bytes: int = 64 << 20
    # ... and the image's part of the prompt: the KV of the prompt up to its image (FastVLM-0.5B's
    # is about 6.5 MiB a photo: some 270 positions of 24 KiB).
    prefix_cache_bytes: int = 256 << 20


@dataclass(frozen=True)
class MdnsSettings:
    enabled: bool = False
    service_name: str = "lumen-vlm"


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP front door (the Ollama and OpenAI APIs, metrics, the page): `server.http`."""

    host: str | None = None  # None: the gRPC server's host
    port: int = 11434  # Ollama's: clients that default to a local Ollama find it there
    # Other names the model answers to (with or without ":latest"), e.g. the name a client's config asks for.
    model_aliases: tuple[str, ...] = ()
    # Hosts whose http(s) image URLs may be fetched; none by default (no server-side fetches to
    # arbitrary addresses): images come as base64 or data: URLs.
    allowed_image_hosts: tuple[str, ...] = ()
    image_fetch_timeout_s: float = 10.0
    # A request body's bytes; None: what the largest request allowed needs (`default_max_body_bytes`).
    max_body_bytes: int | None = None


def default_max_body_bytes(limits: GenerationLimits) -> int:
    """The largest body a valid request can be: its image in base64, its texts JSON-escaped
    (at most 6 bytes a character, for \\uXXXX), and 64 KiB for the rest."""
    base64_image = 4 * -(-limits.max_payload_bytes // 3)
    texts = 6 * (limits.max_messages_chars + limits.max_response_format_chars)
    return base64_image + texts + 64 * 1024


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 50051
    mdns: MdnsSettings = field(default_factory=MdnsSettings)
    http: HttpSettings | None = None  # None: gRPC only (a config's server.http block, or --http-port, turns it on)
    # When set, every API call needs it: HTTP as "Authorization: Bearer KEY", gRPC as the call's
    # "authorization" metadata. server.api_key or the environment's LUMEN_VLM_API_KEY (which wins).
    api_key: str | None = None

    @property
    def http_host(self) -> str:
        return self.host if self.http is None or self.http.host is None else self.http.host


@dataclass(frozen=True)
class VLMSettings:
    """Everything the VLM service needs, from one config file."""

    cache_dir: Path
    model: ModelSettings
    backend: BackendSettings = field(default_factory=BackendSettings)
    limits: GenerationLimits = field(default_factory=GenerationLimits)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    caches: CacheSettings = field(default_factory=CacheSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    service_name: str = "vlm"
    region: str = "other"  # metadata.region: where lumen-resources' Downloader fetches Lumen models
    config_dir: Path | None = None  # the config file's directory: relative model paths resolve from it

    @property
    def model_key(self) -> str:
        """Where the model is configured, as errors name it: ``services.vlm.models.fastvlm``."""
        return f"services.{self.service_name}.models.{self.model.alias}"
