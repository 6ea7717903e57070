"""The model room: turning a generation request into model inputs, and inputs into logits.

It turns image bytes into pixels and features, messages into prompt ids through the model's
own chat template, splices the image features into the prompt's embeddings, keeps the image
feature and prompt-prefix KV caches, and runs prefill (in chunks) and batched decode steps on
the runtime. Sampling, stopping and scheduling are the engine's (`lumen_vlm.engine`) and
`generation/`'s; it knows neither transports nor ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..backends.backend_exceptions import BackendInputError, BackendLoadError
from ..backends.base import BaseFastVLMBackend
from ..backends.kv_cache import KVBlock, KVCache
from ..cache import ByteBudgetLRU
from ..generation import ResponseFormat, SamplingParams, clamp_max_new_tokens
from ..resources.exceptions import ConfigError, ModelFilesError
from ..resources.model_files import ModelFiles, load_tokenizer, locate_model_files, read_file_spec
from ..resources.model_spec import FileSpec, ImageSpec, ModelSpec, ResizeMode, model_spec
from ..resources.settings import BackendSettings, CacheSettings, GenerationLimits, ModelSettings, VLMSettings
from ..text import SHOWN_TEXT_CHARS, shown
from .exceptions import InputError, PromptError
from .image import ImageLimits, image_limits, image_to_pixels
from .prompt import ChatTemplate, encode_prompt, ensure_image_token, render_messages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationParams:
    """How to generate; validated by the service before it gets here."""

    max_new_tokens: int = GenerationLimits.default_max_new_tokens
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_sequences: tuple[str, ...] = ()
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = None  # None: free text


@dataclass(frozen=True)
class GenerationRequest:
    """One request: chat messages, at most one image, and generation parameters."""

    messages: Sequence[Any]
    image: bytes | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    resize_mode: ResizeMode | None = None  # None: the manager's default


@dataclass(frozen=True)
class PreparedRequest:
    """A request turned into model inputs, before any decoder work."""

    input_ids: np.ndarray
    image_features: np.ndarray | None
    max_new_tokens: int
    started: float
    image_key: str | None = None  # the image's content hash, for the backend's prefix cache


def read_model(files: ModelFiles) -> tuple[Tokenizer, FileSpec]:
    """Everything of a model but its graphs: the tokenizer and what the files state, checked
    against each other.

    One sequence for the check before the port opens and for loading, so both refuse the same files.
    """
    tokenizer = load_tokenizer(files.tokenizer)
    stated = read_file_spec(files, tokenizer.token_to_id)
    ensure_image_token(tokenizer, stated.text.image_token_id, files.tokenizer)
    return tokenizer, stated


@dataclass(frozen=True)
class ModelDescription:
    """What the loaded model is, for capabilities and logs, so callers need not reach into the
    backend or the spec."""

    model_id: str
    runtime: str  # e.g. "onnxrt-cpu"
    providers: tuple[str, ...]
    precision: str  # the decoder's
    precisions: tuple[str, ...]  # every precision loaded, the decoder's first
    load_time_ms: float
    image_size: int
    image_tokens: int | None  # None when neither the vision graph nor the files say
    resize_mode: ResizeMode  # the model's default; a request may ask for the other
    context_length: int


class FastVLMModelManager:
    """Owns a backend, the tokenizer and the model spec; turns requests into inputs, inputs into logits."""

    def __init__(
        self,
        backend: BaseFastVLMBackend,
        tokenizer: Tokenizer,
        spec: ModelSpec,
        image_limits: ImageLimits | None = None,
        feature_cache_bytes: int = CacheSettings.feature_cache_bytes,
        prefix_cache_bytes: int = CacheSettings.prefix_cache_bytes,
    ) -> None:
        """`spec`: what the model's files and `backend`'s graphs state, joined (`from_model_dir` makes it)."""
        self.backend = backend
        self.tokenizer = tokenizer
        self.spec = spec
        self.image_limits = image_limits or ImageLimits()
        self.template = ChatTemplate(spec.text.chat_template, spec.text.special_tokens)
        # A second question about the same photo skips the vision encoder.
        self.feature_cache: ByteBudgetLRU[np.ndarray] = ByteBudgetLRU(feature_cache_bytes, lambda a: a.nbytes)
        # The KV of a prompt up to its image, for a new question about the same photo. Used by
        # the engine's one scheduler thread; an entry is copied into a slot, never written.
        self.prefix_cache: ByteBudgetLRU[KVBlock] = ByteBudgetLRU(prefix_cache_bytes, lambda block: block.nbytes)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path | str,
        precision: str = ModelSettings.precision,
        vision_precision: str | None = ModelSettings.vision_precision,
        prefill_precision: str | None = ModelSettings.prefill_precision,
        device: str = BackendSettings.device,
        providers: Sequence[Any] | None = None,
        intra_op_threads: int = BackendSettings.intra_op_threads,
        optimized_graph_dir: Path | None = None,
        **manager_options: Any,
    ) -> FastVLMModelManager:
        """Load a model directory with the ONNX Runtime backend."""
        from ..backends.onnxrt_backend import FastVLMONNXBackend, default_session_options, select_providers

        files = locate_model_files(Path(model_dir), precision, vision_precision, prefill_precision)
        tokenizer, stated = read_model(files)
        chosen = select_providers(device, providers)
        try:
            backend = FastVLMONNXBackend(
                files,
                providers=chosen,
                session_options=default_session_options(intra_op_threads),
                context_length=stated.text.context_length,
                optimized_graph_dir=optimized_graph_dir,
            )
        except BackendLoadError as exc:  # a graph that is not ONNX, or not FastVLM's: the model's files
            raise ModelFilesError(str(exc)) from exc
        # The one place the spec is made; ModelFilesError where the graphs contradict the files.
        return cls(backend, tokenizer, model_spec(stated, backend.graph_spec), **manager_options)

    @classmethod
    def from_settings(cls, settings: VLMSettings, model_dir: Path | str) -> FastVLMModelManager:
        """Load the configured model with the configured device, threads, image limits and cache budgets.

        Every problem with the model's files is a ModelFilesError naming the config key."""
        try:
            return cls.from_model_dir(
                model_dir,
                precision=settings.model.precision,
                vision_precision=settings.model.vision_precision,
                prefill_precision=settings.model.prefill_precision,
                device=settings.backend.device,
                providers=settings.backend.providers,
                # ORT's intra-op pool belongs to the session and is shared by concurrent runs, so
                # its default (one thread per physical core) is right however many run at once.
                intra_op_threads=settings.backend.intra_op_threads,
                image_limits=image_limits(settings.limits),
                optimized_graph_dir=settings.cache_dir / "ort-optimized",
                feature_cache_bytes=settings.caches.feature_cache_bytes,
                prefix_cache_bytes=settings.caches.prefix_cache_bytes,
            )
        except ModelFilesError as exc:
            raise ModelFilesError(f"{settings.model_key}: {exc}") from exc

    @staticmethod
    def check_loadable(settings: VLMSettings, model_dir: Path | str) -> None:
        """Fail fast, before any loading, on a model directory that cannot serve: a ModelFilesError
        naming the config key.

        Reads everything but the graphs (the same `read_model` that loading runs): a missing graph
        or tokenizer, unreadable or contradictory JSON, a chat template that does not compile or
        loses the user's text. What only the graphs can tell (a file that is not ONNX, a vision
        input that states no size) is a ModelFilesError from `from_settings`; the device is
        `check_device`'s.
        """
        try:
            model = settings.model
            files = locate_model_files(
                Path(model_dir), model.precision, model.vision_precision, model.prefill_precision
            )
            _, stated = read_model(files)
            ChatTemplate(stated.text.chat_template, stated.text.special_tokens)  # compiles and probes it
        except ModelFilesError as exc:
            raise ModelFilesError(f"{settings.model_key}: {exc}") from exc

    @staticmethod
    def check_device(settings: VLMSettings) -> None:
        """ConfigError naming the key when this machine cannot run the configured device or providers.

        Needs no model, so a first start checks it before downloading one.
        """
        from ..backends.onnxrt_backend import select_providers

        try:
            select_providers(settings.backend.device, settings.backend.providers)
        except BackendLoadError as exc:
            key = "onnx_providers" if settings.backend.providers else "device"
            raise ConfigError(f"services.{settings.service_name}.backend_settings.{key}: {exc}") from exc

    def describe(self) -> ModelDescription:
        """What the loaded model is, for capabilities and logs."""
        info, spec = self.backend.info, self.spec
        return ModelDescription(
            model_id=spec.model_id,
            runtime=info.runtime,
            providers=info.providers,
            precision=info.precision,
            precisions=info.precisions,
            load_time_ms=info.load_time_ms,
            image_size=spec.image.size,
            image_tokens=spec.image.tokens,
            resize_mode=spec.image.mode,
            context_length=spec.text.context_length,
        )

    # ------------------------------------------------------------------ request -> inputs

    def image_features(self, image: bytes, resize_mode: ResizeMode | None = None) -> tuple[np.ndarray, str]:
        """Image bytes -> (features, content key); features come from the cache when seen before."""
        spec: ImageSpec = self.spec.image if resize_mode is None else replace(self.spec.image, mode=resize_mode)
        key = f"{hashlib.sha256(image).hexdigest()}:{spec.mode.value}"

        def encode() -> np.ndarray:
            features = self.backend.encode_image(image_to_pixels(image, spec, self.image_limits))
            features.setflags(write=False)  # shared by every request about this image
            return features

        return self.feature_cache.get_or_compute(key, encode), key

    def render(self, messages: Sequence[Any], has_image: bool, add_generation_prompt: bool) -> str:
        """Validate the messages and render the prompt text (with one image placeholder)."""
        prompt = render_messages(messages, self.template, has_image, add_generation_prompt)
        log.debug("prompt: %s", shown(prompt, SHOWN_TEXT_CHARS))
        return prompt

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Validate and encode a request: messages -> ids, image -> features. Raises InputError.

        The messages are checked first: a request they make invalid fails before the vision
        encoder's second of work.
        """
        started = time.perf_counter()
        prompt = self.render(request.messages, request.image is not None, request.params.add_generation_prompt)
        features, image_key = None, None
        if request.image is not None:
            features, image_key = self.image_features(request.image, request.resize_mode)
        image_tokens = 0 if features is None else int(features.shape[0])
        ids = encode_prompt(self.tokenizer, prompt, self.spec.text.image_token_id, image_tokens)
        try:
            max_new = clamp_max_new_tokens(request.params.max_new_tokens, int(ids.size), self.spec.text.context_length)
        except ValueError as exc:
            raise PromptError(str(exc)) from exc
        return PreparedRequest(ids, features, max_new, started, image_key)

    # ------------------------------------------------------------------ inputs -> logits

    def new_kv_cache(self, slots: int, slot_tokens: int) -> KVCache:
        return self.backend.new_kv_cache(slots, slot_tokens)

    def prefill(
        self, prepared: PreparedRequest, cache: KVCache, slot: int, chunk_tokens: int
    ) -> Iterator[np.ndarray | None]:
        """Run the prompt into `slot`, one chunk of at most `chunk_tokens` per `next()`: None
        after each chunk but the last, then the float32 [vocab] logits for the first token.

        Chunks let a scheduler decode other sequences between them. The prompt up to and
        including the image is often repeated (a new question about the same photo): its KV
        is kept in the prefix cache, and a chunk always ends there, so the rest of the prompt
        runs on the same numbers whether the prefix was cached or just computed.
        """
        embeds = self._prompt_embeds(prepared)
        ids = prepared.input_ids
        image_positions = np.flatnonzero(ids == self.spec.text.image_token_id)
        split = int(image_positions[-1]) + 1 if image_positions.size else 0
        key = None
        if prepared.image_key is not None and 0 < split < ids.size and self.prefix_cache.max_bytes:
            key = (prepared.image_key, ids[:split].tobytes())
        start = 0
        cached = self.prefix_cache.get(key) if key is not None else None
        if cached is not None:
            cache.write(slot, cached)
            start = split
        logits = None
        for begin, end in _chunks(start, ids.size, chunk_tokens, split):
            logits = self._forward(cache, [slot], embeds[None, begin:end])
            if key is not None and end == split and cached is None:
                self.prefix_cache.put(key, cache.read(slot))
            if end < ids.size:
                yield None
        assert logits is not None  # a prompt is never empty, nor wholly cached
        # The generator stays open while its sequence runs: keep nothing the prompt needed.
        del embeds, cached
        yield logits[0]

    def decode(self, cache: KVCache, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Feed one token to each sequence in `slots`; float32 [len(slots), vocab] logits."""
        embeds = self.backend.embed(np.asarray(tokens, dtype=np.int64))
        return self._forward(cache, slots, embeds[:, None, :])

    def _forward(self, cache: KVCache, slots: Sequence[int], embeds: np.ndarray) -> np.ndarray:
        try:
            return self.backend.forward(cache, slots, embeds)
        except BackendInputError as exc:
            raise InputError(str(exc)) from exc

    def _prompt_embeds(self, prepared: PreparedRequest) -> np.ndarray:
        """The prompt's embeddings with the image features at the image tokens, in order (as
        transformers' masked_scatter puts them)."""
        ids = prepared.input_ids
        embeds = self.backend.embed(ids).copy()
        image_positions = np.flatnonzero(ids == self.spec.text.image_token_id)
        n_features = 0 if prepared.image_features is None else prepared.image_features.shape[0]
        if image_positions.size != n_features:
            raise InputError(
                f"the prompt has {image_positions.size} image tokens but the image gave {n_features} features"
            )
        if n_features:
            embeds[image_positions] = prepared.image_features
        return embeds

    def close(self) -> None:
        self.feature_cache.clear()
        self.prefix_cache.clear()
        self.backend.close()


def _chunks(start: int, end: int, size: int, boundary: int) -> Iterator[tuple[int, int]]:
    """[begin, end) ranges of at most `size` tokens covering start..end, one ending at `boundary`
    when it lies inside."""
    begin = start
    while begin < end:
        stop = min(begin + size, end)
        if begin < boundary < stop:
            stop = boundary
        yield begin, stop
        begin = stop
