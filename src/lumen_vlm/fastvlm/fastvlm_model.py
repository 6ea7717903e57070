"""The model manager: a generation request in, text deltas and a final result out.

It turns image bytes into pixels and messages into prompt ids, drives the backend one token
at a time, and passes the tokens through the sampler, the incremental detokenizer and the
stop-sequence filter. It knows neither gRPC nor ONNX Runtime.

Generation is a lazy iterator: the next decode step runs only when the caller asks for the
next event, so a caller that stops iterating (a cancelled client, a deadline) stops the
model within one step.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..backends.backend_exceptions import BackendInputError, BackendLoadError
from ..backends.base import BaseFastVLMBackend, DecoderSpec, DecoderState, VisionSpec
from ..cache import ByteBudgetLRU
from ..generation import (
    FinishReason,
    IncrementalDetokenizer,
    SamplingParams,
    StopSequenceFilter,
    TokenSampler,
    clamp_max_new_tokens,
)
from ..resources.exceptions import ConfigError, ModelFilesError
from ..resources.model_files import ModelFacts, ModelFiles, load_tokenizer, locate_model_files, read_model_facts
from ..resources.model_spec import ImageSpec, ResizeMode
from ..resources.settings import VLMSettings
from ..text import SHOWN_TEXT_CHARS, shown
from .exceptions import InputError, PromptError
from .image import ImageLimits, image_limits, image_to_pixels
from .prompt import ChatTemplate, encode_prompt, ensure_image_token, render_messages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationParams:
    """How to generate; validated by the service before it gets here."""

    max_new_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_sequences: tuple[str, ...] = ()
    add_generation_prompt: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    """One request: chat messages, at most one image, and generation parameters."""

    messages: Sequence[Any]
    image: bytes | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    resize_mode: ResizeMode | None = None  # None: the manager's default


@dataclass(frozen=True)
class TextDelta:
    """Newly final text; the deltas of one generation join to its result's text."""

    text: str
    generated_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    """The end of one generation."""

    text: str
    finish_reason: FinishReason
    generated_tokens: int
    input_tokens: int
    image_tokens: int
    ttft_ms: float  # request start -> first token sampled
    generation_time_ms: float
    token_ids: tuple[int, ...] = ()  # every sampled token, the final eos included


GenerationEvent = TextDelta | GenerationResult


@dataclass(frozen=True)
class PreparedRequest:
    """A request turned into model inputs, before any decoder work."""

    input_ids: np.ndarray
    image_features: np.ndarray | None
    max_new_tokens: int
    started: float
    image_key: str | None = None  # the image's content hash, for the backend's prefix cache


def read_model(files: ModelFiles) -> tuple[Tokenizer, ModelFacts]:
    """Everything of a model but its graphs: the tokenizer and the facts, checked against each other.

    One sequence for the check before the port opens and for loading, so both refuse the same files.
    """
    tokenizer = load_tokenizer(files.tokenizer)
    facts = read_model_facts(files, tokenizer.token_to_id)
    ensure_image_token(tokenizer, facts.image_token_id, files.tokenizer)
    return tokenizer, facts


def image_spec(stated: ImageSpec, vision: VisionSpec) -> ImageSpec:
    """The image spec the model's files state, with the size settled against the vision graph.

    The graph's input shape is what the encoder accepts; where it leaves the size dynamic, the
    files' size (preprocessor_config.json, or model_info.json's vision_config) is used.
    """
    if vision.image_size and stated.size and vision.image_size != stated.size:
        raise ModelFilesError(
            f"the vision encoder graph takes {vision.image_size}-pixel images, but the model's files state "
            f"{stated.size} (preprocessor_config.json or model_info.json's vision_config.image_size)"
        )
    size = vision.image_size or stated.size
    if not size:
        raise ModelFilesError(
            "no image size: the vision encoder graph's input leaves it dynamic, and neither "
            "preprocessor_config.json nor model_info.json's extra_metadata.vision_config.image_size states it"
        )
    stated_tokens = stated.tokens_for(size)
    if vision.image_tokens and stated_tokens and vision.image_tokens != stated_tokens:
        raise ModelFilesError(
            f"the vision encoder graph gives {vision.image_tokens} image tokens, but model_info.json's "
            f"vision_config (image_size {size}, patch_size {stated.patch_size}) means {stated_tokens}"
        )
    return replace(stated, size=size)


def check_decoder(facts: ModelFacts, decoder: DecoderSpec, vision: VisionSpec) -> None:
    """Refuse graphs that do not belong together, or that contradict model_info.json's kv_cache_config.

    The graphs are what runs, and their shapes are what the backend uses; a kv_cache_config that
    disagrees means the metadata (image token, eos ids, context) may describe another model.
    """
    if vision.feature_dim != decoder.hidden_size:
        raise ModelFilesError(
            f"the vision encoder gives {vision.feature_dim}-wide image features, but the decoder takes "
            f"{decoder.hidden_size}-wide embeddings: the graphs are not of one model"
        )
    stated = facts.kv_cache
    if stated is None:
        return
    for key, graph_value in (
        ("num_hidden_layers", decoder.num_layers),
        ("num_key_value_heads", decoder.num_kv_heads),
        ("head_dim", decoder.head_dim),
    ):
        if getattr(stated, key) != graph_value:
            raise ModelFilesError(
                f"model_info.json's kv_cache_config.{key} is {getattr(stated, key)}, but the decoder graph's "
                f"is {graph_value}: the metadata and the graphs are not of one model"
            )


class FastVLMModelManager:
    """Owns a backend, the tokenizer and the model's facts; serves generation requests."""

    def __init__(
        self,
        backend: BaseFastVLMBackend,
        tokenizer: Tokenizer,
        facts: ModelFacts,
        image_limits: ImageLimits | None = None,
        resize_mode: ResizeMode | None = None,
        feature_cache_bytes: int = 64 << 20,
    ) -> None:
        """`resize_mode` None: the rule the model's files state (`model_files.resize_rule`).

        Raises ModelFilesError where the graphs contradict the model's files."""
        self.backend = backend
        self.tokenizer = tokenizer
        self.facts = facts
        self.image_limits = image_limits or ImageLimits()
        self.template = ChatTemplate(facts.chat_template, facts.special_tokens)
        check_decoder(facts, backend.decoder_spec, backend.vision_spec)
        self.image_spec = image_spec(facts.image, backend.vision_spec)
        if resize_mode is not None:
            self.image_spec = replace(self.image_spec, mode=resize_mode)
        # Features per image: the vision graph's output shape, else (size / patch)^2; None if neither says.
        self.image_tokens = backend.vision_spec.image_tokens or self.image_spec.tokens_for(self.image_spec.size)
        # A second question about the same photo skips the vision encoder.
        self.feature_cache: ByteBudgetLRU[np.ndarray] = ByteBudgetLRU(feature_cache_bytes, lambda a: a.nbytes)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path | str,
        precision: str = "fp32",
        device: str = "auto",
        providers: Sequence[Any] | None = None,
        intra_op_threads: int = 0,
        prefix_cache_bytes: int = 256 << 20,
        optimized_graph_dir: Path | None = None,
        **manager_options: Any,
    ) -> FastVLMModelManager:
        """Load a model directory with the ONNX Runtime backend."""
        from ..backends.onnxrt_backend import FastVLMONNXBackend, default_session_options, select_providers

        files = locate_model_files(Path(model_dir), precision)
        tokenizer, facts = read_model(files)
        chosen = select_providers(device, providers)
        try:
            backend = FastVLMONNXBackend(
                files,
                providers=chosen,
                session_options=default_session_options(intra_op_threads),
                context_length=facts.context_length,
                prefix_cache_bytes=prefix_cache_bytes,
                optimized_graph_dir=optimized_graph_dir,
            )
        except BackendLoadError as exc:  # a graph that is not ONNX, or not FastVLM's: the model's files
            raise ModelFilesError(str(exc)) from exc
        return cls(backend, tokenizer, facts, **manager_options)

    @classmethod
    def from_settings(cls, settings: VLMSettings, model_dir: Path | str) -> FastVLMModelManager:
        """Load the configured model with the configured device, threads and image limits.

        Every problem with the model's files is a ModelFilesError naming the config key."""
        try:
            return cls.from_model_dir(
                model_dir,
                precision=settings.model.precision,
                device=settings.backend.device,
                providers=settings.backend.providers,
                # ORT's intra-op pool belongs to the session and is shared by concurrent runs, so
                # its default (one thread per physical core) is right however many run at once.
                intra_op_threads=settings.backend.intra_op_threads,
                image_limits=image_limits(settings.limits),
                optimized_graph_dir=settings.cache_dir / "ort-optimized",
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
            files = locate_model_files(Path(model_dir), settings.model.precision)
            _, facts = read_model(files)
            ChatTemplate(facts.chat_template, facts.special_tokens)  # compiles and probes it
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

    def describe(self) -> dict[str, Any]:
        """Facts for capabilities and logs, so callers need not reach into the backend."""
        info = self.backend.info
        return {
            "model_id": self.model_id,
            "runtime": info.runtime,
            "providers": list(info.providers),
            "precision": info.precision,
            "precisions": list(dict.fromkeys([info.precision, *info.graph_precisions.values()])),
            "load_time_ms": info.load_time_ms,
            "image_size": self.image_spec.size,
            "image_tokens": self.image_tokens,
            "resize_mode": self.image_spec.mode.value,
            "context_length": self.context_length,
        }

    @property
    def context_length(self) -> int:
        return self.facts.context_length

    @property
    def model_id(self) -> str:
        return self.facts.model_id

    # ------------------------------------------------------------------ request -> inputs

    def image_features(self, image: bytes, resize_mode: ResizeMode | None = None) -> tuple[np.ndarray, str]:
        """Image bytes -> (features, content key); features come from the cache when seen before."""
        spec: ImageSpec = self.image_spec if resize_mode is None else replace(self.image_spec, mode=resize_mode)
        key = f"{hashlib.sha256(image).hexdigest()}:{spec.mode.value}"

        def encode() -> np.ndarray:
            features = self.backend.encode_image(image_to_pixels(image, spec, self.image_limits))
            features.setflags(write=False)  # shared by every request about this image
            return features

        return self.feature_cache.get_or_compute(key, encode), key

    def prompt_ids(self, messages: Sequence[Any], image_tokens: int | None, add_generation_prompt: bool) -> np.ndarray:
        prompt = self.render(messages, image_tokens is not None, add_generation_prompt)
        return encode_prompt(self.tokenizer, prompt, self.facts.image_token_id, image_tokens or 0)

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
        ids = encode_prompt(self.tokenizer, prompt, self.facts.image_token_id, image_tokens)
        try:
            max_new = clamp_max_new_tokens(request.params.max_new_tokens, int(ids.size), self.context_length)
        except ValueError as exc:
            raise PromptError(str(exc)) from exc
        return PreparedRequest(ids, features, max_new, started, image_key)

    # ------------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest) -> Iterator[GenerationEvent]:
        """Stream TextDelta events, then one GenerationResult."""
        return self.generate_prepared(self.prepare(request), request.params)

    def generate_text(self, request: GenerationRequest) -> GenerationResult:
        """Run a request to the end and return only the result."""
        for event in self.generate(request):
            if isinstance(event, GenerationResult):
                return event
        raise RuntimeError("generation ended without a result")  # pragma: no cover - generator contract

    def generate_prepared(
        self, prepared: PreparedRequest, params: GenerationParams, check: Callable[[], None] | None = None
    ) -> Iterator[GenerationEvent]:
        """Generate from a prepared request; `check` runs before every decode step and may
        raise to stop the generation there (a cancelled call, a passed deadline)."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        stop_filter = StopSequenceFilter(params.stop_sequences)
        pieces: list[str] = []
        tokens: list[int] = []
        finish = FinishReason.LENGTH
        ttft_ms = 0.0
        count = 0
        for count, token in enumerate(self._sample_tokens(prepared, params.sampling, check), start=1):
            if count == 1:
                ttft_ms = (time.perf_counter() - prepared.started) * 1000.0
            tokens.append(token)
            if token in self.facts.eos_token_ids:
                finish = FinishReason.EOS
                break
            text, stopped = stop_filter.feed(detokenizer.push(token))
            if text:
                pieces.append(text)
                yield TextDelta(text, count)
            if stopped:
                finish = FinishReason.STOP_SEQUENCE
                break
        if finish is not FinishReason.STOP_SEQUENCE:
            # Release what was held back: an unfinished character, a possible stop-sequence start.
            text, stopped = stop_filter.feed(detokenizer.flush())
            if stopped:
                finish = FinishReason.STOP_SEQUENCE
            else:
                text += stop_filter.flush()
            if text:
                pieces.append(text)
                yield TextDelta(text, count)
        yield GenerationResult(
            text="".join(pieces),
            finish_reason=finish,
            generated_tokens=count,
            input_tokens=int(prepared.input_ids.size),
            image_tokens=0 if prepared.image_features is None else int(prepared.image_features.shape[0]),
            ttft_ms=ttft_ms,
            generation_time_ms=(time.perf_counter() - prepared.started) * 1000.0,
            token_ids=tuple(tokens),
        )

    def _sample_tokens(
        self, prepared: PreparedRequest, sampling: SamplingParams, check: Callable[[], None] | None
    ) -> Iterator[int]:
        """Prefill, then sample and decode one token at a time, up to the request's limit."""
        sampler = TokenSampler(sampling)
        history = list(prepared.input_ids.tolist())
        try:
            state: DecoderState = self.backend.prefill(
                prepared.input_ids,
                prepared.image_features,
                self.facts.image_token_id,
                prepared.image_key,
                reserve=prepared.max_new_tokens,
            )
        except BackendInputError as exc:
            raise InputError(str(exc)) from exc
        logits = state.logits
        for step in range(prepared.max_new_tokens):
            token = sampler.next_token(logits, history)
            yield token
            if step + 1 < prepared.max_new_tokens:
                if check is not None:
                    check()
                history.append(token)
                logits = self.backend.decode_step(state, token)

    def close(self) -> None:
        self.feature_cache.clear()
        self.backend.close()
