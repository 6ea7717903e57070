"""What the server has been doing, for Prometheus: `GET /metrics` on the HTTP front door.

Both front doors record their requests here (`ServingMetrics.track`), so the counts and
histograms cover gRPC and HTTP alike, labelled by transport. What the engine and the model room
hold right now (queue, batch, KV cache, caches, load time) is read at scrape time by a collector,
never copied: a scrape always sees the present.

Each service has its own registry (not prometheus_client's global one), so two services in one
process (tests do this) never share or clash.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine import ClientGone, DeadlineExceeded, GenerationResult, Overloaded, TextDelta, Unavailable
from .fastvlm.exceptions import InputError

if TYPE_CHECKING:
    from .engine import Engine
    from .fastvlm.fastvlm_model import FastVLMModelManager

PREFIX = "lumen_vlm"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
# From a small photo on a GPU (tens of ms) to a full queue on a slow CPU (a minute).
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def outcome_of(error: BaseException | None) -> str:
    """A request's outcome label: ok, or what kind of failure (an error may name its own)."""
    if error is None:
        return "ok"
    named = getattr(error, "outcome", None)
    if isinstance(named, str):
        return named
    if isinstance(error, InputError):
        return "invalid_request"
    if isinstance(error, Overloaded):
        return "overloaded"
    if isinstance(error, Unavailable):
        return "unavailable"
    if isinstance(error, DeadlineExceeded):
        return "deadline_exceeded"
    if isinstance(error, ClientGone | GeneratorExit):
        return "cancelled"
    return "internal_error"


class RequestTracker:
    """One request's metrics: its text deltas as the front door sends them, then its end."""

    def __init__(self, metrics: ServingMetrics, transport: str, task: str) -> None:
        self._metrics = metrics
        self._transport = transport
        self._task = task
        self._last_at: float | None = None
        self._last_tokens = 0
        self._ended = False

    def delta(self, event: TextDelta) -> None:
        """Inter-token time as the front door saw it: a delta holding several tokens (a
        multi-byte character, text held back for a stop sequence) counts as that many equal gaps."""
        now = time.perf_counter()
        tokens = event.generated_tokens - self._last_tokens
        if self._last_at is not None and tokens > 0:
            gap = (now - self._last_at) / tokens
            histogram = self._metrics.inter_token.labels(self._transport)
            for _ in range(tokens):
                histogram.observe(gap)
        self._last_at, self._last_tokens = now, event.generated_tokens

    def finished(self, result: GenerationResult) -> None:
        if self._ended:
            return
        self._ended = True
        metrics, transport = self._metrics, self._transport
        metrics.requests.labels(transport, self._task, "ok").inc()
        metrics.ttft.labels(transport).observe(result.ttft_ms / 1000.0)
        metrics.prompt_tokens.labels(transport).inc(result.input_tokens)
        metrics.generation_tokens.labels(transport).inc(result.generated_tokens)

    def failed(self, error: BaseException) -> None:
        if self._ended:
            return
        self._ended = True
        self._metrics.requests.labels(self._transport, self._task, outcome_of(error)).inc()


class ServingMetrics:
    """The service's metrics registry: request counters and histograms, and the engine's state."""

    def __init__(self, engine: Engine, manager: FastVLMModelManager) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests answered, by transport, task and outcome.",
            ["transport", "task", "outcome"], registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Submission to first token (queue, image and prefill included).",
            ["transport"], buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.inter_token = Histogram(
            f"{PREFIX}_inter_token_seconds", "Time between a request's tokens, as its front door sent them.",
            ["transport"], buckets=INTER_TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of completed requests (image tokens included).",
            ["transport"], registry=registry,
        )  # fmt: skip
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens generated by completed requests.", ["transport"], registry=registry
        )
        registry.register(EngineCollector(engine, manager))

    def track(self, transport: str, task: str) -> RequestTracker:
        return RequestTracker(self, transport, task)

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """The engine's and the model room's state, read at each scrape."""

    def __init__(self, engine: Engine, manager: FastVLMModelManager) -> None:
        self._engine = engine
        self._manager = manager

    def collect(self) -> Iterator[Any]:
        engine, manager = self._engine, self._manager
        yield _gauge("queue_depth", "Requests waiting for a batch slot.", engine.waiting)
        yield _gauge("batch_slots", "Batch slots (max_concurrency).", engine.max_concurrency)
        yield _gauge("batch_slots_used", "Batch slots held (preparing, prefilling or decoding).", engine.active)
        yield _gauge("running_batch_size", "Sequences in the decode batch.", engine.running)
        yield _gauge("kv_cache_tokens", "Positions the KV cache holds, every slot together.", engine.kv_tokens)
        yield _gauge("kv_cache_tokens_used", "Positions of the KV cache in use now.", engine.kv_tokens_used)
        yield _gauge("model_load_seconds", "Time the model took to load.", manager.describe().load_time_ms / 1000.0)
        for name, cache, what in (
            ("image_feature_cache", manager.feature_cache, "image features (the vision encoder skipped)"),
            ("prefix_cache", manager.prefix_cache, "prompt-prefix KV blocks (the prefill up to the image skipped)"),
        ):
            yield _counter(f"{name}_hits", f"Lookups that found {what}.", cache.hits)
            yield _counter(f"{name}_misses", "Lookups that found nothing.", cache.misses)
            yield _gauge(f"{name}_bytes", "Bytes the cache holds.", cache.bytes_used)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
