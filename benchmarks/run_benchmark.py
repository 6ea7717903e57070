"""Lumen VLM against transformers on the FastVLM-0.5B architecture, side by side in one run.

    python benchmarks/run_benchmark.py                # full size (builds and caches the model once)
    python benchmarks/run_benchmark.py --quick        # tiny model: checks the benchmark works

The model is a random-weight FastVLM-0.5B built by tools/make_test_model.py (random weights
cost exactly what real ones do), with int8 and q4 decoders from tools/quantize_model.py.
Each engine runs in its own process (so its peak RSS is its own), one after another, on the
same 1024x1024 photo and a ~20-token question, greedy, ignoring EOS so every run decodes the
same number of tokens. The machine's memory read bandwidth is measured just before and after
each engine, and its decode speed is set against it (bytes of decoder weights read per token).

The concurrency mode (--streams, on by default for Lumen's engines) then drives the same
process's `Engine`: N streams submitted at once, each a different photo, and a burst of
--burst photos at once against the same photos one after another (see `concurrency_runs`).

Medians over --runs runs after one warm-up; JSON to --json, a markdown table to stdout.

--peers sets our decoder beside llama.cpp's and onnxruntime-genai's instead (benchmarks/peers.py,
the [bench] extra).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LUMEN_VLM_BENCH_CACHE", "~/.cache/lumen-vlm/bench")).expanduser()
QUESTION = "Describe this photo in detail: what objects, colours and people do you see?"
MESSAGES = [{"role": "user", "content": QUESTION}]
ENGINES = ("lumen-fp32", "lumen-int8", "lumen-q4", "transformers")
# Opt-in (--engines): a decoder precision with the int8 vision encoder tools/quantize_vision.py
# writes into the model directory (run it first; it needs scikit-image's photos).
VISION_INT8_ENGINES = ("lumen-int8-vision-int8", "lumen-q4-vision-int8")
# Opt-in too: the q4 decoder with prompts through the int8 one (prefill_precision: int8).
PREFILL_INT8_ENGINES = ("lumen-q4-prefill-int8", "lumen-q4-vision-int8-prefill-int8")
OPT_IN_ENGINES = VISION_INT8_ENGINES + PREFILL_INT8_ENGINES
# The concurrency mode: streams submitted at once, and the burst set against one after another.
STREAMS = (1, 2, 4, 8)
BURST_PHOTOS = 16
# The engine it drives: 8 batch slots of 512 positions each, room for a 1024 px photo's prompt
# (~330 tokens) and 64 new tokens. The budget is set, not the server's default (16384), so
# that the RSS target (files + KV budget + 15%) is held to the KV these streams can use.
BATCH_SLOTS = 8
KV_BUDGET_TOKENS = BATCH_SLOTS * 512
# The targets: aggregate decode with 4 streams against 1, per engine; peak RSS with 8
# streams against the model's files and the KV budget.
FOUR_STREAM_GAIN = {"lumen-fp32": 3.5, "lumen-int8": 2.5, "lumen-q4": 2.0}
RSS_HEADROOM = 1.15
STREAM_TIMEOUT_S = 900.0  # a stream that takes longer has hung: the benchmark fails, not waits


# --------------------------------------------------------------------------- inputs


def make_photo(variant: int = 0, size: int = 1024) -> bytes:
    """A deterministic 1024x1024 JPEG with some structure; each `variant` has other bytes (its
    own noise and shapes), so neither the feature cache nor the prefix cache knows it."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(variant)
    base = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([base[None, :].repeat(size, 0), base[:, None].repeat(size, 1), np.full((size, size), 90.0)], -1)
    pixels += rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    shift = 37 * variant % 200
    draw.ellipse((300 + shift, 200, 700 + shift, 600), fill=(240, 220 - variant % 100, 30))
    draw.rectangle((100, 750 - shift, 900, 950 - shift), fill=(20, 120, 40 + variant % 150))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def ensure_model(model_dir: Path, size: str) -> Path:
    """Build the random-weight model (ONNX + PyTorch weights) and its quantized decoders once."""
    marker = model_dir / ".bench-complete"
    if marker.exists():
        return model_dir
    command = [sys.executable, str(ROOT / "tools/make_test_model.py"), "--size", size, "--save-torch"]
    subprocess.run([*command, "--out", str(model_dir)], check=True)
    sys.path.insert(0, str(ROOT))
    from tools.quantize_model import quantize_decoder

    for precision in ("int8", "q4"):
        quantize_decoder(model_dir, precision)
    marker.write_text("ok\n")
    return model_dir


# --------------------------------------------------------------------------- machine


def memory_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second the machine reads from RAM, every core reading its part of one array.

    np.max over float32 is a SIMD loop that keeps up with memory (a float64 np.sum does not:
    its pairwise summation is compute-bound), so this measures the memory, not the ALU.
    """
    threads = os.cpu_count() or 1
    data = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.max, args=(chunk,)) for chunk in chunks]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


# --------------------------------------------------------------------------- workers


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return (time.perf_counter() - start) * 1000.0, value


def reset_peak_rss() -> None:
    """Start the VmHWM count afresh (Linux: writing 5 to clear_refs resets the peak)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). ru_maxrss is no good here: on Linux it survives
    fork+exec, so a worker would report its parent's peak (which quantized the models)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class EncodeClock:
    """The model's backend, timing each vision encode: how the benchmark sees the encoder's
    share of `prepare()` and what an encode costs while other streams decode."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.encodes_ms: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        ms, features = timed(lambda: self._backend.encode_image(pixel_values))
        self.encodes_ms.append(ms)
        return features


def engine_precisions(engine: str) -> tuple[str, str | None, str | None]:
    """(decoder precision, vision precision, prefill precision) of a lumen engine's name,
    ``lumen-PRECISION[-vision-PRECISION][-prefill-PRECISION]``; None where the decoder's."""
    rest, _, prefill = engine.removeprefix("lumen-").partition("-prefill-")
    precision, _, vision = rest.partition("-vision-")
    return precision, vision or None, prefill or None


def load_manager(
    model_dir: Path, precision: str, vision: str | None = None, prefill: str | None = None
) -> tuple[Any, float, EncodeClock]:
    """The model as the server loads it, with ORT's optimized graphs saved in the cache (made by
    a first load, not timed); (manager, load ms, its encode clock). EOS is taken out of the
    model's facts, so that every stream generates exactly the tokens it asks for: a random-weight
    model may sample EOS at any step, and a shorter stream would decode less than the others."""
    from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager
    from lumen_vlm.resources.model_files import locate_model_files

    if vision and locate_model_files(model_dir, precision, vision).graph_precisions["vision"] != vision:
        raise SystemExit(f"{model_dir} has no {vision} vision encoder: run tools/quantize_vision.py {model_dir}")
    optimized = model_dir.parent / "ort-optimized"  # beside the model: --quick's goes with its temp dir

    def load() -> Any:
        return FastVLMModelManager.from_model_dir(
            model_dir,
            precision=precision,
            vision_precision=vision,
            prefill_precision=prefill,
            optimized_graph_dir=optimized,
        )

    load().close()
    reset_peak_rss()
    load_ms, manager = timed(load)
    manager.spec = replace(manager.spec, text=replace(manager.spec.text, eos_token_ids=frozenset()))
    clock = EncodeClock(manager.backend)
    manager.backend = clock
    return manager, load_ms, clock


def progress(message: str) -> None:
    """A line on stderr: a full run takes a while on a shared machine."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def forget_photos(manager: Any) -> None:
    """Empty the feature and prefix caches: the next request about any photo starts cold."""
    manager.feature_cache.clear()
    manager.prefix_cache.clear()


def single_stream(manager: Any, clock: EncodeClock, runs: int, new_tokens: int) -> dict[str, float]:
    """Each phase of one request for a new photo, timed on a KV cache of one slot: the model's
    own calls in the order the engine makes them, without the engine's threads."""
    from lumen_vlm.fastvlm.fastvlm_model import GenerationParams, GenerationRequest
    from lumen_vlm.resources.settings import AdmissionSettings

    chunk_tokens = AdmissionSettings().prefill_chunk_tokens  # as the engine prefills
    request = GenerationRequest(MESSAGES, make_photo(), GenerationParams(max_new_tokens=new_tokens))

    def cold_run() -> dict[str, float]:
        forget_photos(manager)
        prepare_ms, prepared = timed(lambda: manager.prepare(request))  # image -> features, messages -> ids
        vision_ms = clock.encodes_ms[-1]
        prepared = replace(prepared, image_key=None)  # no prefix cache: every run prefills the whole prompt
        cache = manager.new_kv_cache(1, int(prepared.input_ids.size) + new_tokens)
        chunks = manager.prefill(prepared, cache, 0, chunk_tokens)
        prefill_ms, logits = timed(lambda: deque(chunks, maxlen=1)[0])  # the first token's logits come last
        token = int(np.argmax(logits))
        start = time.perf_counter()
        for _ in range(new_tokens - 1):  # greedy, EOS ignored: every run decodes the same count
            token = int(np.argmax(manager.decode(cache, [0], [token])[0]))
        decode_s = time.perf_counter() - start
        return {
            "preprocess_ms": prepare_ms - vision_ms,  # decoding and resizing the photo, rendering the prompt
            "vision_ms": vision_ms,
            "prefill_ms": prefill_ms,
            "ttft_ms": prepare_ms + prefill_ms,
            "decode_tok_s": (new_tokens - 1) / decode_s,
            "prompt_tokens": int(prepared.input_ids.size),
        }

    cold_run()
    samples = [cold_run() for _ in range(runs)]
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


class TokenClock:
    """The model as the engine sees it, stamping every token of every photo request: a token's
    time is when the decoder call that gives its logits returns (the engine samples it at the
    start of its next step). The client's text deltas cannot say this: a token that completes no
    character sends no text, and random weights sample many of them (special and byte tokens).

    Requests are told apart by their photo (its content key); each stream has its own."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._request_of: dict[str, Any] = {}  # a photo's key -> the request that asked about it
        self._owner: dict[int, Any] = {}  # a batch slot -> the request prefilled into it, if a photo's
        self.times: dict[int, list[float]] = {}  # id(request) -> its tokens' times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def reset(self) -> None:
        self.times = {}

    def prepare(self, request: Any) -> Any:
        prepared = self._model.prepare(request)
        if prepared.image_key is not None:
            self._request_of[prepared.image_key] = request
        return prepared

    def prefill(self, prepared: Any, cache: Any, slot: int, chunk_tokens: int) -> Iterator[np.ndarray | None]:
        request = self._owner[slot] = self._request_of.get(prepared.image_key)
        chunks = self._model.prefill(prepared, cache, slot, chunk_tokens)
        try:
            for logits in chunks:
                if logits is not None:
                    self._stamp(request, time.perf_counter())
                yield logits
        finally:
            chunks.close()

    def decode(self, cache: Any, slots: list[int], tokens: list[int]) -> np.ndarray:
        logits = self._model.decode(cache, slots, tokens)
        now = time.perf_counter()
        for slot in slots:
            self._stamp(self._owner.get(slot), now)
        return logits

    def _stamp(self, request: Any, now: float) -> None:
        if request is not None:
            self.times.setdefault(id(request), []).append(now)


@dataclass
class Stream:
    """One request: when it was submitted, when each of its tokens was decoded, what it got."""

    submitted: float
    token_times: list[float] = field(default_factory=list)
    generated_tokens: int = 0
    ttft_ms: float = 0.0  # the engine's: submission -> first token sampled

    @property
    def first_token(self) -> float:
        return self.token_times[0]

    @property
    def last_token(self) -> float:
        return self.token_times[-1]

    def decode_tok_s(self) -> float:
        """Tokens after the first, per second, from the first token to the last."""
        return (len(self.token_times) - 1) / (self.last_token - self.first_token)

    def gaps_ms(self) -> list[float]:
        return [(after - before) * 1000.0 for before, after in itertools.pairwise(self.token_times)]


def follow(handle: Any) -> Stream:
    """Read one request's events to the end (as its client would); its result's counts."""
    stream = Stream(handle.submitted)
    result = handle.result()
    stream.generated_tokens, stream.ttft_ms = result.generated_tokens, result.ttft_ms
    return stream


def with_token_times(clock: TokenClock, requests: list[Any], streams: list[Stream]) -> list[Stream]:
    for request, stream in zip(requests, streams, strict=True):
        stream.token_times = clock.times.get(id(request), [])
    return streams


def at_once(engine: Any, clock: TokenClock, requests: list[Any]) -> tuple[list[Stream], float]:
    """Submit every request at once, each read by its own thread; (streams, wall seconds from
    the first submission to the last token)."""
    clock.reset()
    start = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(follow, engine.submit(request)) for request in requests]
        streams = [future.result(timeout=STREAM_TIMEOUT_S) for future in futures]
    wall = time.perf_counter() - start
    return with_token_times(clock, requests, streams), wall


def one_after_another(engine: Any, clock: TokenClock, requests: list[Any]) -> tuple[list[Stream], float]:
    clock.reset()
    start = time.perf_counter()
    streams = [follow(engine.submit(request)) for request in requests]
    wall = time.perf_counter() - start
    return with_token_times(clock, requests, streams), wall


def check_lengths(streams: Iterable[Stream], new_tokens: int) -> None:
    """Every stream generated exactly `new_tokens`, each stamped, or its figures would not compare."""
    wrong = [(s.generated_tokens, len(s.token_times)) for s in streams]
    if any(counts != (new_tokens, new_tokens) for counts in wrong):
        raise RuntimeError(f"streams generated and stamped {wrong} tokens, not {new_tokens} each")


def aggregate_decode_tok_s(streams: list[Stream]) -> float | None:
    """Decode tokens of every stream per second, while every stream decodes: tokens after each
    stream's first that arrive between the last stream's first token and the first stream's
    last, over that window. None when the streams never all decode at once."""
    start, end = max(s.first_token for s in streams), min(s.last_token for s in streams)
    if end <= start:
        return None
    tokens = sum(1 for s in streams for t in s.token_times[1:] if start < t <= end)
    return tokens / (end - start)


def gaps_while_joining_ms(streams: list[Stream]) -> list[float]:
    """Inter-token gaps of running streams that overlap another stream's joining (from its
    submission to its first token: its vision encode and its prefill)."""
    joins = [(s.submitted, s.first_token) for s in streams]
    gaps = []
    for index, stream in enumerate(streams):
        for before, after in itertools.pairwise(stream.token_times):
            if any(other != index and joined < after and first > before for other, (joined, first) in enumerate(joins)):
                gaps.append((after - before) * 1000.0)
    return gaps


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass(frozen=True)
class Bench:
    """What the concurrency mode drives: an engine over the model, seen through the clocks."""

    manager: Any
    engine: Any
    tokens: TokenClock
    encodes: EncodeClock

    @classmethod
    def start(cls, manager: Any, encodes: EncodeClock) -> Bench:
        """BATCH_SLOTS slots sharing KV_BUDGET_TOKENS, a queue that holds a whole burst, and no
        queue timeout that a slow burst could reach."""
        from lumen_vlm.engine import Engine
        from lumen_vlm.resources.settings import AdmissionSettings

        admission = AdmissionSettings(
            max_concurrency=BATCH_SLOTS,
            kv_cache_tokens=KV_BUDGET_TOKENS,
            max_queue=max(BURST_PHOTOS, AdmissionSettings().max_queue),
            queue_timeout_s=STREAM_TIMEOUT_S,
        )
        tokens = TokenClock(manager)
        return cls(manager, Engine(tokens, admission), tokens, encodes)

    def photo_requests(self, variants: Iterable[int], new_tokens: int) -> list[Any]:
        from lumen_vlm.fastvlm.fastvlm_model import GenerationParams, GenerationRequest

        params = GenerationParams(max_new_tokens=new_tokens)
        return [GenerationRequest(MESSAGES, make_photo(variant), params) for variant in variants]


def same_photo_ttft(bench: Bench, question_index: int) -> float:
    """TTFT of the served path for a new question about a photo asked about before."""
    from lumen_vlm.fastvlm.fastvlm_model import GenerationParams, GenerationRequest

    photo, params = make_photo(), GenerationParams(max_new_tokens=1)
    bench.engine.submit(GenerationRequest(MESSAGES, photo, params)).result()  # the photo's first question
    question = [{"role": "user", "content": f"{QUESTION} (question {question_index})"}]
    return float(bench.engine.submit(GenerationRequest(question, photo, params)).result().ttft_ms)


def streams_runs(bench: Bench, count: int, runs: int, new_tokens: int) -> dict[str, Any]:
    """`count` streams at once, each a different photo: once cold (photos never seen: each is
    encoded and prefilled while the others run), then `runs` times warm (the same requests again:
    the photos' features and prompt prefixes are cached, so the streams join within a few steps
    and the decode window is theirs)."""
    progress(f"{count} streams at once")
    requests = bench.photo_requests(range(1, count + 1), new_tokens)
    forget_photos(bench.manager)
    encodes = len(bench.encodes.encodes_ms)
    cold, cold_s = at_once(bench.engine, bench.tokens, requests)
    cold_encodes = bench.encodes.encodes_ms[encodes:]
    warm = [at_once(bench.engine, bench.tokens, requests)[0] for _ in range(runs)]
    check_lengths([*cold, *itertools.chain(*warm)], new_tokens)
    warm_gaps = [gap for streams in warm for s in streams for gap in s.gaps_ms()]
    joining = gaps_while_joining_ms(cold)
    aggregates = [aggregate_decode_tok_s(streams) for streams in warm]
    measured = [a for a in aggregates if a is not None]
    return {
        "streams": count,
        "cold_ttft_ms": [s.ttft_ms for s in cold],
        "cold_wall_s": cold_s,
        "cold_vision_ms": cold_encodes,
        "cold_per_stream_decode_tok_s": statistics.median(s.decode_tok_s() for s in cold),
        "join_gaps": len(joining),
        "join_gap_p99_ms": percentile(joining, 99),
        "join_gap_max_ms": max(joining, default=None),
        "aggregate_decode_tok_s": statistics.median(measured) if measured else None,
        "aggregate_decode_runs": aggregates,
        "per_stream_decode_tok_s": statistics.median(s.decode_tok_s() for streams in warm for s in streams),
        "gap_p50_ms": percentile(warm_gaps, 50),
        "gap_p99_ms": percentile(warm_gaps, 99),
        "warm_ttft_ms": statistics.median(s.ttft_ms for streams in warm for s in streams),
    }


def burst_runs(bench: Bench, photos: int, new_tokens: int) -> dict[str, Any]:
    """`photos` new photos captioned one after another, then the same photos (caches emptied
    again) submitted at once: as many run as there are batch slots, the rest wait their turn."""
    progress(f"{photos} photos one after another, then at once")
    requests = bench.photo_requests(range(100, 100 + photos), new_tokens)
    forget_photos(bench.manager)
    sequential, sequential_s = one_after_another(bench.engine, bench.tokens, requests)
    forget_photos(bench.manager)
    burst, burst_s = at_once(bench.engine, bench.tokens, requests)
    check_lengths([*sequential, *burst], new_tokens)
    joining = gaps_while_joining_ms(burst)
    return {
        "photos": photos,
        "one_after_another_s": sequential_s,
        "one_after_another_per_min": photos / sequential_s * 60.0,
        "at_once_s": burst_s,
        "at_once_per_min": photos / burst_s * 60.0,
        "at_once_ttft_ms": [s.ttft_ms for s in burst],
        "join_gap_p99_ms": percentile(joining, 99),
    }


def warm_up(bench: Bench, new_tokens: int) -> None:
    """Text-only requests, one per slot, at once: every batch size runs before any is timed."""
    from lumen_vlm.fastvlm.fastvlm_model import GenerationParams, GenerationRequest

    request = GenerationRequest(MESSAGES, None, GenerationParams(max_new_tokens=new_tokens))
    at_once(bench.engine, bench.tokens, [request] * bench.engine.max_concurrency)


def concurrency_runs(bench: Bench, streams: Iterable[int], burst: int, runs: int, new_tokens: int) -> dict[str, Any]:
    """The concurrency mode; its peak RSS is its own (the count is reset when it starts)."""
    engine = bench.engine
    warm_up(bench, new_tokens)
    reset_peak_rss()
    result: dict[str, Any] = {
        "max_concurrency": engine.max_concurrency,
        "kv_cache_tokens": engine.max_concurrency * engine.slot_tokens,
        "slot_tokens": engine.slot_tokens,
        "slot_bytes": engine.slot_bytes,
        "kv_budget_bytes": engine.max_concurrency * engine.slot_bytes,
        "prefill_chunk_tokens": engine.prefill_chunk_tokens,
        "runs": [streams_runs(bench, count, runs, new_tokens) for count in streams],
    }
    if burst:
        result["burst"] = burst_runs(bench, burst, new_tokens)
    result["peak_rss_mb"] = peak_rss_mb()
    for run, step_ms in zip(result["runs"], decoder_step_ms(bench.manager, streams, new_tokens), strict=True):
        run["decoder_step_ms"] = step_ms
    return result


def decoder_step_ms(manager: Any, batches: Iterable[int], steps: int) -> list[float]:
    """The decoder alone, without the engine: the median time of one decode step for B rows, each
    holding the single-stream photo's prompt (its KV copied into every slot). Set against the
    engine's aggregate, it tells the decoder's cost from the engine's own."""
    from lumen_vlm.fastvlm.fastvlm_model import GenerationParams, GenerationRequest
    from lumen_vlm.resources.settings import AdmissionSettings

    progress("the decoder alone, by batch size")
    request = GenerationRequest(MESSAGES, make_photo(), GenerationParams(max_new_tokens=steps))
    prepared = replace(manager.prepare(request), image_key=None)
    slot_tokens = int(prepared.input_ids.size) + steps + 1
    one = manager.new_kv_cache(1, slot_tokens)
    deque(manager.prefill(prepared, one, 0, AdmissionSettings().prefill_chunk_tokens), maxlen=0)
    prompt, token = one.read(0), int(prepared.input_ids[-1])
    return [batch_step_ms(manager, prompt, rows, slot_tokens, token, steps) for rows in batches]


def batch_step_ms(manager: Any, prompt: Any, rows: int, slot_tokens: int, token: int, steps: int) -> float:
    cache = manager.new_kv_cache(rows, slot_tokens)
    for slot in range(rows):
        cache.write(slot, prompt)
    slots, tokens = list(range(rows)), [token] * rows
    manager.decode(cache, slots, tokens)  # a warm-up step
    return statistics.median(timed(lambda: manager.decode(cache, slots, tokens))[0] for _ in range(steps - 1))


def lumen_worker(
    model_dir: Path, engine: str, runs: int, new_tokens: int, streams: tuple[int, ...], burst: int
) -> dict[str, Any]:
    progress(f"{engine}: loading, then one stream")
    manager, load_ms, encodes = load_manager(model_dir, *engine_precisions(engine))
    result: dict[str, Any] = single_stream(manager, encodes, runs, new_tokens)
    result["peak_rss_mb"] = peak_rss_mb()  # one stream's: before the engine's KV cache is used
    bench = Bench.start(manager, encodes)
    try:
        result["same_photo_ttft_ms"] = statistics.median(same_photo_ttft(bench, i) for i in range(runs))
        if streams:
            result["concurrency"] = concurrency_runs(bench, streams, burst, runs, new_tokens)
    finally:
        bench.engine.close()
    info = manager.backend.info
    result.update(
        {
            "engine": engine,
            "load_ms": load_ms,
            "decoder_bytes": info.decoder_bytes,
            "model_bytes": info.model_bytes,
            "providers": list(info.providers),
        }
    )
    return result


def transformers_worker(model_dir: Path, runs: int, new_tokens: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tools.make_test_model import import_reference_stack, reference_messages, reference_pixels

    import_reference_stack()
    import torch
    from transformers import AutoTokenizer, FastVlmForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """Times each token as generate() emits it: decode speed from one call."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:  # the prompt first, then each new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

        def decode_tokens_per_second(self, new_tokens: int) -> float:
            assert len(self.times) == new_tokens + 1, "one put for the prompt, one per token"
            return (new_tokens - 1) / (self.times[-1] - self.times[1])

    torch.set_num_threads(os.cpu_count() or 1)
    load_ms, model = timed(lambda: FastVlmForConditionalGeneration.from_pretrained(str(model_dir / "torch")).eval())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    size = json.loads((model_dir / "preprocessor_config.json").read_text())["crop_size"]["height"]
    photo = make_photo()
    image_id = model.config.image_token_index

    def cold_run() -> dict[str, float]:
        pixels_ms, pixels = timed(lambda: torch.from_numpy(reference_pixels(photo, size, "pad")))
        with torch.inference_mode():
            vision_ms, features = timed(lambda: model.get_image_features(pixel_values=pixels).pooler_output)
            prompt = tokenizer.apply_chat_template(
                reference_messages([{"role": "user", "content": QUESTION}]), tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            expanded = [t for token in ids for t in ([token] * features.shape[1] if token == image_id else [token])]
            input_ids = torch.tensor([expanded])
            kwargs = {"input_ids": input_ids, "pixel_values": pixels, "do_sample": False, "pad_token_id": 0}
            ttft_ms, _ = timed(lambda: model.generate(**kwargs, max_new_tokens=1, min_new_tokens=1))
            embeds = model.get_input_embeddings()(input_ids)
            embeds[input_ids == image_id] = features.reshape(-1, embeds.shape[-1])
            prefill_ms, _ = timed(lambda: model(inputs_embeds=embeds, logits_to_keep=1))
            clock = TokenClock()
            model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock)
        return {
            "preprocess_ms": pixels_ms,
            "vision_ms": vision_ms,
            "prefill_ms": prefill_ms,
            "ttft_ms": pixels_ms + ttft_ms,
            "decode_tok_s": clock.decode_tokens_per_second(new_tokens),
            "prompt_tokens": len(expanded),
        }

    cold_run()
    samples = [cold_run() for _ in range(runs)]
    result = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    decoder = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if "vision_tower" not in n and "projector" not in n
    )
    result.update(
        {
            "engine": "transformers",
            "load_ms": load_ms,
            "same_photo_ttft_ms": None,
            "decoder_bytes": decoder,
            "model_bytes": weights,
            "providers": [f"torch {torch.__version__} ({torch.get_num_threads()} threads)"],
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    return result


def run_worker(
    engine: str, model_dir: Path, runs: int, new_tokens: int, streams: tuple[int, ...] = (), burst: int = 0
) -> dict[str, Any]:
    """Run one engine in a fresh process and return its measurements (Lumen's engines with the
    concurrency mode when `streams` are given)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    command = [
        sys.executable,
        __file__,
        "--worker",
        engine,
        "--model-dir",
        str(model_dir),
        "--runs",
        str(runs),
        "--new-tokens",
        str(new_tokens),
        "--json",
        str(out_path),
    ]
    if engine != "transformers":
        command += ["--streams", *map(str, streams), "--burst", str(burst)]
    subprocess.run(command, check=True, cwd=ROOT)
    result = json.loads(out_path.read_text())
    out_path.unlink()
    return result


# --------------------------------------------------------------------------- report


def run_beside_bandwidth(
    engine: str, model_dir: Path, runs: int, new_tokens: int, gib: float, streams: tuple[int, ...], burst: int
) -> dict[str, Any]:
    """One engine's measurements, with the machine's memory read bandwidth measured just
    before and just after it (the better of the two): on a shared machine the bandwidth
    moves with the neighbours, so a single probe at the start of a long run is no ceiling
    for an engine measured minutes later."""
    before = memory_read_bandwidth(gib)
    result = run_worker(engine, model_dir, runs, new_tokens, streams, burst)
    result["memory_read_gb_s"] = max(before, memory_read_bandwidth(gib)) / 1e9
    return result


def add_bandwidth(results: list[dict[str, Any]]) -> None:
    """Decoder bytes read per token x tokens/s, as a fraction of the RAM bandwidth measured
    beside each engine."""
    for result in results:
        bandwidth = result["memory_read_gb_s"] * 1e9
        achieved = result["decoder_bytes"] * result["decode_tok_s"]
        result["achieved_gb_s"] = achieved / 1e9
        result["bandwidth_fraction"] = achieved / bandwidth
        result["decode_ceiling_tok_s"] = bandwidth / result["decoder_bytes"]


def markdown_table(results: list[dict[str, Any]]) -> str:
    reference = next((r for r in results if r["engine"] == "transformers"), None)
    header = (
        "| engine | load s | vision ms | prefill ms | TTFT ms | same photo TTFT ms | decode tok/s "
        "| decode vs transformers | TTFT vs transformers | bandwidth used | peak RSS MB | model MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        decode_ratio = f"{r['decode_tok_s'] / reference['decode_tok_s']:.2f}x" if reference else "-"
        ttft_ratio = f"{r['ttft_ms'] / reference['ttft_ms']:.2f}x" if reference else "-"
        same = f"{r['same_photo_ttft_ms']:.0f}" if r.get("same_photo_ttft_ms") is not None else "-"
        lines.append(
            f"| {r['engine']} | {r['load_ms'] / 1000:.1f} | {r['vision_ms']:.0f} | {r['prefill_ms']:.0f} "
            f"| {r['ttft_ms']:.0f} | {same} | {r['decode_tok_s']:.1f} | {decode_ratio} | {ttft_ratio} "
            f"| {r['bandwidth_fraction'] * 100:.0f}% of {r['decode_ceiling_tok_s']:.1f} tok/s "
            f"({r['memory_read_gb_s']:.1f} GB/s) "
            f"| {r['peak_rss_mb']:.0f} | {r['model_bytes'] / 1e6:.0f} |"
        )
    return "\n".join(lines)


def target_lines(results: list[dict[str, Any]]) -> list[str]:
    """The performance targets as table rows: what each asks, this run's value, met or not."""
    engines = {r["engine"]: r for r in results}
    fp32, q4, ref = engines.get("lumen-fp32"), engines.get("lumen-q4"), engines.get("transformers")
    if not (fp32 and q4 and ref):
        return []
    fp32_speedup = fp32["decode_tok_s"] / ref["decode_tok_s"]
    q4_speedup = q4["decode_tok_s"] / ref["decode_tok_s"]
    ttft_ratio = fp32["ttft_ms"] / ref["ttft_ms"]
    repeat_ratio = fp32["same_photo_ttft_ms"] / fp32["ttft_ms"]
    checks = [
        (
            "fp32 decode >= 90% of the bandwidth ceiling",
            f"{fp32['bandwidth_fraction']:.0%}",
            fp32["bandwidth_fraction"] >= 0.9,
        ),
        ("fp32 decode >= 2x transformers", f"{fp32_speedup:.2f}x", fp32_speedup >= 2.0),
        ("q4 decode >= 8x transformers", f"{q4_speedup:.2f}x", q4_speedup >= 8.0),
        ("TTFT, new photo (fp32) <= 0.6x transformers", f"{ttft_ratio:.2f}x", ttft_ratio <= 0.6),
        ("same photo, new question: TTFT <= 25% of the first", f"{repeat_ratio:.0%}", repeat_ratio <= 0.25),
    ]
    for r in (fp32, engines.get("lumen-int8"), q4):
        if r:
            ratio = r["peak_rss_mb"] * 1e6 / r["model_bytes"]
            checks.append((f"{r['engine']} peak RSS <= model files + 25%", f"{ratio:.2f}x the files", ratio <= 1.25))
    return [f"| {name} | {value} | {'met' if met else 'not met'} |" for name, value, met in checks]


def concurrency_of(results: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(r["engine"], r["concurrency"]) for r in results if r.get("concurrency")]


def by_streams(concurrency: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {run["streams"]: run for run in concurrency["runs"]}


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def concurrency_table(results: list[dict[str, Any]]) -> str:
    header = (
        "| engine | streams | TTFT ms, new photos (first / median / last) | aggregate decode tok/s | vs 1 stream "
        "| per-stream decode tok/s | gap p50 / p99 ms | p99 gap while photos join ms "
        "| decoder alone: step ms (tok/s) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for engine, concurrency in concurrency_of(results):
        runs = by_streams(concurrency)
        single = runs.get(1, {}).get("aggregate_decode_tok_s")
        for count, run in runs.items():
            step = run["decoder_step_ms"]
            alone = f"{step:.1f} ({count * 1000 / step:.1f})"
            ttfts = sorted(run["cold_ttft_ms"])
            aggregate = run["aggregate_decode_tok_s"]
            gain = f"{aggregate / single:.2f}x" if aggregate and single else "-"
            lines.append(
                f"| {engine} | {count} | {ttfts[0]:.0f} / {statistics.median(ttfts):.0f} / {ttfts[-1]:.0f} "
                f"| {aggregate:.1f} | {gain} | {run['per_stream_decode_tok_s']:.1f} "
                f"| {ms(run['gap_p50_ms'])} / {ms(run['gap_p99_ms'])} | {ms(run['join_gap_p99_ms'])} | {alone} |"
                if aggregate
                else f"| {engine} | {count} | - | no window in which every stream decodes | - | - | - | - | {alone} |"
            )
    return "\n".join(lines)


def burst_table(results: list[dict[str, Any]]) -> str:
    header = (
        "| engine | photos | one after another: s (photos/min) | all at once: s (photos/min) | gain "
        "| p99 gap while photos join ms | peak RSS MB | model files + KV budget MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for engine, concurrency in concurrency_of(results):
        burst = concurrency.get("burst")
        if not burst:
            continue
        model_bytes = next(r["model_bytes"] for r in results if r["engine"] == engine)
        lines.append(
            f"| {engine} | {burst['photos']} "
            f"| {burst['one_after_another_s']:.1f} ({burst['one_after_another_per_min']:.1f}) "
            f"| {burst['at_once_s']:.1f} ({burst['at_once_per_min']:.1f}) "
            f"| {burst['at_once_per_min'] / burst['one_after_another_per_min']:.2f}x "
            f"| {ms(burst['join_gap_p99_ms'])} | {concurrency['peak_rss_mb']:.0f} "
            f"| {(model_bytes + concurrency['kv_budget_bytes']) / 1e6:.0f} |"
        )
    return "\n".join(lines)


def concurrency_target_lines(results: list[dict[str, Any]]) -> list[str]:
    """The concurrency targets as table rows, per engine: what each asks, this run's value, met or not."""
    checks: list[tuple[str, str, bool]] = []
    for engine, concurrency in concurrency_of(results):
        result = next(r for r in results if r["engine"] == engine)
        runs = by_streams(concurrency)
        aggregate = {count: run["aggregate_decode_tok_s"] for count, run in runs.items()}
        if aggregate.get(1) and aggregate.get(4) and engine in FOUR_STREAM_GAIN:
            gain, wanted = aggregate[4] / aggregate[1], FOUR_STREAM_GAIN[engine]
            checks.append((f"{engine}: aggregate decode, 4 streams vs 1 >= {wanted}x", f"{gain:.2f}x", gain >= wanted))
        if aggregate.get(4) and aggregate.get(8):
            gain = aggregate[8] / aggregate[4]
            checks.append((f"{engine}: aggregate decode, 8 streams > 4 streams", f"{gain:.2f}x", gain > 1.0))
        joining = [run["join_gap_p99_ms"] for run in runs.values() if run["join_gap_p99_ms"] is not None]
        if joining:
            worst = max(joining)
            checks.append(
                (
                    f"{engine}: p99 gap while new photos join < one vision encode ({result['vision_ms']:.0f} ms)",
                    f"{worst:.0f} ms (worst of {len(joining)} stream counts)",
                    worst < result["vision_ms"],
                )
            )
        if runs.get(BATCH_SLOTS):
            allowed = (result["model_bytes"] + concurrency["kv_budget_bytes"]) * RSS_HEADROOM
            peak = concurrency["peak_rss_mb"] * 1e6
            checks.append(
                (
                    f"{engine}: RSS with {BATCH_SLOTS} streams <= (model files + KV budget) x {RSS_HEADROOM}",
                    f"{peak / 1e6:.0f} MB of {allowed / 1e6:.0f} MB",
                    peak <= allowed,
                )
            )
    return [f"| {name} | {value} | {'met' if met else 'not met'} |" for name, value, met in checks]


def concurrency_markdown(results: list[dict[str, Any]]) -> list[str]:
    found = concurrency_of(results)
    if not found:
        return []
    config = found[0][1]
    per_token = config["slot_bytes"] / config["slot_tokens"]
    lines = [
        "## Concurrency",
        "",
        f"The engine: {config['max_concurrency']} batch slots sharing a KV budget of {config['kv_cache_tokens']} "
        f"tokens, {config['slot_tokens']} per slot; a slot costs {config['slot_bytes'] / (1 << 20):.1f} MiB "
        f"({per_token / 1024:.0f} KiB a token), the budget {config['kv_budget_bytes'] / (1 << 20):.0f} MiB; "
        f"prompts are prefilled {config['prefill_chunk_tokens']} tokens per step between the running streams' steps.",
        "",
        concurrency_table(results),
        "",
        burst_table(results),
        "",
    ]
    targets = concurrency_target_lines(results)
    if targets:
        lines += ["| target | this run | |", "|---|---|---|", *targets, ""]
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    bandwidths = [r["memory_read_gb_s"] for r in report["results"]]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} cores, {machine['memory_gib']} GiB; "
        f"Python {machine['python']}, onnxruntime {machine['onnxruntime']}. "
        "Memory read bandwidth, measured just before and after each engine: "
        f"{min(bandwidths):.1f} to {max(bandwidths):.1f} GB/s.",
        "",
        f"Model: random-weight FastVLM-0.5B ({report['size']}), one 1024x1024 photo, a ~20-token question, "
        f"{report['new_tokens']} new tokens (greedy, EOS ignored); medians of {report['runs']} runs after a "
        "warm-up; every engine in its own process, one after another, same threads.",
        "",
        markdown_table(report["results"]),
        "",
    ]
    targets = target_lines(report["results"])
    if targets:
        lines += ["| target | this run | |", "|---|---|---|", *targets, ""]
    lines += concurrency_markdown(report["results"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 run: a smoke test, not a measurement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, help="use (and cache) the model here")
    parser.add_argument("--engines", nargs="+", choices=ENGINES + OPT_IN_ENGINES, default=list(ENGINES))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the report here (e.g. benchmarks/RESULTS.md)")
    parser.add_argument(
        "--streams", nargs="*", type=int, default=list(STREAMS), help="concurrency mode: streams at once (none: off)"
    )
    parser.add_argument(
        "--burst", type=int, default=BURST_PHOTOS, help="concurrency mode: photos in the burst (0: off)"
    )
    parser.add_argument(
        "--peers", action="store_true", help="our decoder beside llama.cpp and onnxruntime-genai (benchmarks/peers.py)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="peers mode: rounds of every engine in turn")
    parser.add_argument("--worker", choices=ENGINES + OPT_IN_ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    streams = tuple(args.streams)
    if any(not 1 <= count <= BATCH_SLOTS for count in streams) or args.burst < 0:
        parser.error(f"--streams take 1 to {BATCH_SLOTS} (the engine's batch slots); --burst 0 or more")

    if args.worker:
        if args.worker == "transformers":
            result = transformers_worker(args.model_dir, args.runs, args.new_tokens)
        else:
            result = lumen_worker(args.model_dir, args.worker, args.runs, args.new_tokens, streams, args.burst)
        args.json.write_text(json.dumps(result))
        return 0

    if args.peers:
        from peers import main as peers_main

        model_dir = (args.model_dir or CACHE / "fastvlm-0.5b-random").expanduser()
        return peers_main(ensure_model(model_dir, "full"), args.rounds, args.json)

    size = "tiny" if args.quick else "full"
    runs = 1 if args.quick else args.runs
    new_tokens = 8 if args.quick else args.new_tokens
    temporary = None
    if args.model_dir is None and args.quick:
        temporary = Path(tempfile.mkdtemp(prefix="lumen-vlm-bench-"))
        model_dir = temporary / "tiny"
    else:
        model_dir = (args.model_dir or CACHE / "fastvlm-0.5b-random").expanduser()
    try:
        ensure_model(model_dir, size)
        gib = 0.25 if args.quick else 1.0
        results = [
            run_beside_bandwidth(engine, model_dir, runs, new_tokens, gib, streams, args.burst)
            for engine in args.engines
        ]
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    add_bandwidth(results)
    report = {
        "machine": machine_description(),
        "memory_read_gb_s": max(r["memory_read_gb_s"] for r in results),
        "size": size,
        "runs": runs,
        "new_tokens": new_tokens,
        "results": results,
    }
    write_report(report, report_markdown(report), args.json, args.markdown)
    return 0


def write_report(report: dict[str, Any], text: str, json_path: Path | None, markdown_path: Path | None) -> None:
    """The report as JSON and markdown where asked, and the markdown on stdout."""
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown_path:
        markdown_path.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
