"""FastVLM on ONNX Runtime: three sessions, IOBinding, and a per-request KV cache.

Every model fact this module needs is read from the sessions themselves: layer count and
KV shape from the decoder's ``past_key_values.*`` inputs, vocabulary size from its logits,
image size and token count from the vision encoder. Nothing about FastVLM-0.5B is assumed.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import ByteBudgetLRU
from ..resources.model_files import GRAPHS, ModelFiles, graph_files
from .backend_exceptions import BackendInputError, BackendLoadError
from .base import BackendInfo, BaseFastVLMBackend, DecoderSpec, DecoderState, VisionSpec
from .optimized_graphs import DerivedDecoder, OptimizedGraphCache, copy_options
from .ort_runtime import ort

log = logging.getLogger(__name__)

# Most capable first; CPU is always the last resort.
PROVIDER_PRIORITY = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)
DEVICE_PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "mps": ("CoreMLExecutionProvider", "CPUExecutionProvider"),
    "coreml": ("CoreMLExecutionProvider", "CPUExecutionProvider"),
    "directml": ("DmlExecutionProvider", "CPUExecutionProvider"),
    "openvino": ("OpenVINOExecutionProvider", "CPUExecutionProvider"),
}
_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
_INDEX_TYPES = ("tensor(int64)", "tensor(int32)")  # what ids, masks and positions may be declared as
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)")  # what embeddings, the KV cache and logits may be
_PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# Optional decoder inputs some exports add, which a plain decode feeds as documented in DecoderFeeds.
LOGITS_TO_KEEP = "num_logits_to_keep"
CACHE_BRANCH = "use_cache_branch"

ProviderSpec = str | tuple[str, dict[str, Any]]
# ONNX Runtime's own spelling of every provider it knows. lumen-app's presets spell two of them
# differently (TensorRTExecutionProvider, DMLExecutionProvider), and ORT matches names exactly.
_KNOWN_PROVIDERS = {name.lower(): name for name in ort.get_all_providers()}


def select_providers(
    device: str = "auto",
    configured: Sequence[str | Sequence[Any]] | None = None,
    available: Sequence[str] | None = None,
) -> list[ProviderSpec]:
    """Execution providers to use, most preferred first.

    `configured` (names, or [name, {options}] pairs) wins over `device`; "auto" takes every
    available provider in PROVIDER_PRIORITY order.
    """
    available = list(available if available is not None else ort.get_available_providers())
    if configured:
        return _configured_providers(configured, available)
    device = device.lower()
    if device == "auto":
        return [p for p in PROVIDER_PRIORITY if p in available] or ["CPUExecutionProvider"]
    if device not in DEVICE_PROVIDERS:
        raise BackendLoadError(f"unknown device {device!r}; known: auto, {', '.join(DEVICE_PROVIDERS)}")
    wanted = DEVICE_PROVIDERS[device]
    if wanted[0] not in available:
        raise BackendLoadError(
            f"device {device!r} needs {wanted[0]}, which this onnxruntime build lacks; "
            f"available: {', '.join(available)}"
        )
    return [p for p in wanted if p in available]


def _configured_providers(configured: Sequence[str | Sequence[Any]], available: Sequence[str]) -> list[ProviderSpec]:
    """The configured providers that this build has, in the configured order.

    A list of several is a preference order, as lumen-app writes them ([CoreML, CPU] for every
    Mac, whether or not the installed build has CoreML): the unavailable ones are skipped, with
    one warning, and only none available is an error. A single named provider must be available.
    """
    entries = [_provider_entry(entry) for entry in configured]
    chosen: list[ProviderSpec] = [
        (name, options) if options else name for name, options in entries if name in available
    ]
    if not chosen:
        names, have = ", ".join(name for name, _ in entries), ", ".join(available)
        if len(entries) == 1:
            raise BackendLoadError(
                f"execution provider {names} is not available in this onnxruntime build; available: {have}"
            )
        raise BackendLoadError(
            f"none of the execution providers {names} is available in this onnxruntime build; available: {have}"
        )
    skipped = tuple((name, _why_unavailable(name)) for name, _ in entries if name not in available)
    if skipped:
        _warn_skipped(skipped, tuple(available))
    return chosen


def _provider_entry(entry: str | Sequence[Any]) -> tuple[str, dict[str, Any] | None]:
    """(ONNX Runtime's name for the provider, its options or None)."""
    name, options = (entry, None) if isinstance(entry, str) else (entry[0], dict(entry[1]))
    return _KNOWN_PROVIDERS.get(name.lower(), name), options


def _why_unavailable(name: str) -> str:
    if name.lower() not in _KNOWN_PROVIDERS:
        return "not an ONNX Runtime provider name"
    return "not in this onnxruntime build"


@functools.cache
def _warn_skipped(skipped: tuple[tuple[str, str], ...], available: tuple[str, ...]) -> None:
    """Once per process for each combination: a server checks its providers before loading, then
    loads with them."""
    log.warning(
        "skipping execution providers %s; using the rest of the configured list (available: %s)",
        "; ".join(f"{name}: {why}" for name, why in skipped),
        ", ".join(available),
    )


def provider_names(providers: Sequence[ProviderSpec]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def _device_type(providers: Sequence[str]) -> str:
    """Where ORT should leave outputs (the KV cache) between steps."""
    return "cuda" if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(providers) else "cpu"


def default_session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads  # 0: ORT's default, one per physical core
    options.log_severity_level = 3  # warnings from graph partitioning are noise for users
    return options


@dataclass(frozen=True)
class DecoderFeeds:
    """The decoder's inputs besides inputs_embeds and the KV cache, in the types it declares.

    Two optional inputs are fed the values a plain decode needs:
    - ``num_logits_to_keep`` (transformers.js exports; transformers' ``logits_to_keep``):
      1, the last position's logits only, as transformers.js feeds it while generating (0
      would mean every position);
    - ``use_cache_branch`` (optimum's merged decoders, an If over two decoders): false on
      a request's first pass, which has no past, and true after it.
    """

    mask_dtype: type
    position_dtype: type
    logits_to_keep: np.ndarray | None = None  # the value for num_logits_to_keep, if declared
    cache_branch: tuple[np.ndarray, np.ndarray] | None = None  # use_cache_branch: (first pass, after)

    def bind(self, binding: ort.IOBinding, past_length: int, total: int) -> None:
        """Bind the inputs for a run over positions past_length .. total-1."""
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=self.mask_dtype))
        positions = np.arange(past_length, total, dtype=self.position_dtype).reshape(1, -1)
        binding.bind_cpu_input("position_ids", positions)
        if self.logits_to_keep is not None:
            binding.bind_cpu_input(LOGITS_TO_KEEP, self.logits_to_keep)
        if self.cache_branch is not None:
            binding.bind_cpu_input(CACHE_BRANCH, self.cache_branch[past_length > 0])


def read_decoder_feeds(inputs: dict[str, Any]) -> DecoderFeeds:
    """How to feed a decoder session's inputs (name -> NodeArg); BackendLoadError, naming the
    input, for any input this engine cannot feed or a type it cannot give it."""
    known = {"inputs_embeds", "attention_mask", "position_ids", LOGITS_TO_KEEP, CACHE_BRANCH}
    unknown = sorted(name for name in inputs if name not in known and not _PAST_KEY.match(name))
    if unknown:
        raise BackendLoadError(
            f"the decoder graph has inputs this engine does not know how to feed: {', '.join(unknown)}"
        )
    feeds = DecoderFeeds(
        mask_dtype=_declared_dtype(inputs["attention_mask"], _INDEX_TYPES),
        position_dtype=_declared_dtype(inputs["position_ids"], _INDEX_TYPES),
    )
    if LOGITS_TO_KEEP in inputs:
        arg = inputs[LOGITS_TO_KEEP]
        feeds = replace(feeds, logits_to_keep=_single_value(arg, 1, _declared_dtype(arg, _INDEX_TYPES)))
    if CACHE_BRANCH in inputs:
        arg = inputs[CACHE_BRANCH]
        dtype = _declared_dtype(arg, ("tensor(bool)",))
        feeds = replace(feeds, cache_branch=(_single_value(arg, False, dtype), _single_value(arg, True, dtype)))
    return feeds


def _declared_dtype(arg: Any, allowed: Sequence[str], graph: str = "decoder") -> type:
    """The numpy type of a graph input declared as one of `allowed`; BackendLoadError otherwise."""
    if arg.type not in allowed:
        raise BackendLoadError(
            f"the {graph} graph's input {arg.name} is {arg.type}; this engine feeds it as {' or '.join(allowed)}"
        )
    return _ORT_TO_NUMPY[arg.type]


def _single_value(arg: Any, value: object, dtype: type) -> np.ndarray:
    """`value` in the input's declared rank: a scalar, or one element in each dimension."""
    dims = list(arg.shape or [])
    if any(isinstance(d, int) and d != 1 for d in dims):
        raise BackendLoadError(f"the decoder graph's input {arg.name} has shape {dims}; expected a single value")
    return np.full([1] * len(dims), value, dtype=dtype)


@dataclass
class OrtDecoderState(DecoderState):
    """A request's KV cache, held as ORT values between steps.

    With a fused decoder the cache is allocated once, for `capacity` positions, and every
    step writes its keys and values into it in place; the first `length` are filled. It is
    copied only to start from a cached prefix or to grow. Otherwise (capacity None) each
    step's outputs are the next step's inputs, never copied.
    """

    past: list[ort.OrtValue]
    length: int
    last_logits: np.ndarray
    capacity: int | None = None

    @property
    def logits(self) -> np.ndarray:
        return self.last_logits


class FastVLMONNXBackend(BaseFastVLMBackend):
    """Runs the onnx-community three-graph FastVLM export with ONNX Runtime."""

    def __init__(
        self,
        files: ModelFiles,
        providers: Sequence[ProviderSpec] | None = None,
        session_options: ort.SessionOptions | None = None,
        context_length: int | None = None,
        prefix_cache_bytes: int = 256 << 20,
        optimized_graph_dir: Path | None = None,
    ) -> None:
        started = time.perf_counter()
        # A cached prefix state is never handed out or written: requests continue from its
        # ORT values (read-only inputs) or from a copy, so concurrent requests can share it.
        self.prefix_cache: ByteBudgetLRU[OrtDecoderState] = ByteBudgetLRU(prefix_cache_bytes, _state_bytes)
        self._providers = list(providers or select_providers("auto"))
        self._graph_cache = OptimizedGraphCache(optimized_graph_dir) if optimized_graph_dir else None
        # ORT's saved optimized graphs hold CPU-specific rewrites: reused with the CPU provider only.
        self._cpu_only = provider_names(self._providers) == ["CPUExecutionProvider"]
        options = session_options or default_session_options()
        _log_graph_choice(files)
        # The vision encoder's activations at 1024 px are hundreds of MB, needed once per new
        # photo: without an arena they are freed after each encode (measured: ~290 MB less
        # resident memory for fp32), at no measurable cost next to a 1.3 s encode.
        self._vision = self._open(files.graphs["vision"], copy_options(options, enable_cpu_mem_arena=False))
        self._embed = self._open(files.graphs["embed"], options)
        self._context_length = context_length
        # How many layers' attention runs as one fused kernel (0: as the graph spells it out);
        # with it, each request's KV cache is allocated once and written in place.
        self.fused_attention_layers = 0
        self.fused_norms = 0  # RMS norms run as one kernel each
        # Not ORT's saved optimized decoder: its memory-mapped weights are not pre-packed for
        # the GEMM kernels, and decoding measured ~18% slower that way. A rewritten copy (see
        # OptimizedGraphCache.derived_decoder) is used when one can be made.
        # last_position_logits: whether prefill's logits come for the last position only.
        self._decoder, self.last_position_logits = self._open_decoder(files.graphs["decoder"], options)
        active = tuple(self._decoder.get_providers())
        self._device = _device_type(active)
        self._vision_spec = self._read_vision_spec(files.graphs["vision"])
        try:
            self._decoder_spec, self._past_names, self._present_names = self._read_decoder_io()
            self._feeds = read_decoder_feeds({v.name: v for v in self._decoder.get_inputs()})
            self._ids_dtype = self._read_ids_dtype()
            self._kv_dtype = _dtype_of(self._decoder.get_inputs(), self._past_names[0])
            self._embeds_dtype = _dtype_of(self._decoder.get_inputs(), "inputs_embeds")
            self._logits_dtype = _dtype_of(self._decoder.get_outputs(), "logits")
        except (BackendLoadError, ValueError, TypeError, IndexError) as exc:  # e.g. int() of a dynamic dimension
            raise BackendLoadError(
                f"{files.root}: the embedding and decoder graphs' inputs and outputs are not a FastVLM export's: {exc}"
            ) from exc
        # num_logits_to_keep = 1 makes the graph itself compute the last position's logits only.
        self.last_position_logits = self.last_position_logits or self._feeds.logits_to_keep is not None
        self._info = BackendInfo(
            runtime=f"onnxrt-{self._device}",
            providers=active,
            precision=files.precision,
            graph_precisions=dict(files.graph_precisions),
            load_time_ms=(time.perf_counter() - started) * 1000.0,
            model_bytes=sum(_file_bytes(p) for p in files.graphs.values()),
            decoder_bytes=_file_bytes(files.graphs["decoder"]),
        )
        log.info(
            "loaded %s (%s, %s) in %.0f ms; attention %s, %d RMS norms fused",
            files.root.name,
            files.precision,
            ", ".join(active),
            self._info.load_time_ms,
            "fused" if self.fused_attention_layers else "as exported",
            self.fused_norms,
        )

    # ------------------------------------------------------------------ loading

    def _open(self, path: Path, options: ort.SessionOptions, reuse_optimized: bool = True) -> ort.InferenceSession:
        try:
            if self._graph_cache is not None and reuse_optimized and self._cpu_only:
                return self._graph_cache.open(path, options, self._providers)
            return ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as exc:  # ORT raises several unrelated types: not ONNX, missing weights, bad graph
            raise BackendLoadError(f"cannot load {path}: {exc}") from exc

    def _open_decoder(self, source: Path, options: ort.SessionOptions) -> tuple[ort.InferenceSession, bool]:
        """(decoder session, whether its logits cover the last position only)."""
        derived = self._derived_decoder(source)
        if derived is not None:
            try:
                session = self._open(derived.path, options, reuse_optimized=False)
            except BackendLoadError as exc:  # a damaged copy: drop it, the source still works
                log.warning("discarding %s (%s)", derived.path.parent, exc)
                shutil.rmtree(derived.path.parent, ignore_errors=True)
            else:
                self.fused_attention_layers = derived.fused_attention_layers
                self.fused_norms = derived.fused_norms
                return session, derived.last_position_logits
        return self._open(source, options, reuse_optimized=False), False

    def _derived_decoder(self, source: Path) -> DerivedDecoder | None:
        if self._graph_cache is None:
            return None
        # The fused kernels are checked against the graph on the CPU provider when made, and
        # are used there only.
        return self._graph_cache.derived_decoder(source, self._cpu_only, self._context_length)

    def _read_vision_spec(self, path: Path) -> VisionSpec:
        """Image size and token count where the graph fixes them (0 / None where it leaves them dynamic)."""
        inputs, outputs = self._vision.get_inputs(), self._vision.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1 or len(outputs[0].shape) != 3:
            raise BackendLoadError(
                f"{path} is not a FastVLM vision encoder: it should take one [batch, 3, height, width] input and "
                f"give one [batch, tokens, hidden] output; it takes {_shapes(inputs)} and gives {_shapes(outputs)}"
            )
        sides = {side for side in inputs[0].shape[2:] if isinstance(side, int)}
        tokens, feature_dim = outputs[0].shape[1:]
        if len(sides) > 1 or not isinstance(feature_dim, int):
            raise BackendLoadError(
                f"{path}: the vision encoder should take square images and give features of a fixed width; "
                f"it takes {_shapes(inputs)} and gives {_shapes(outputs)}"
            )
        return VisionSpec(
            image_size=sides.pop() if sides else 0,
            image_tokens=tokens if isinstance(tokens, int) else None,
            feature_dim=feature_dim,
        )

    def _read_ids_dtype(self) -> type:
        """The type the embedding graph declares its input_ids in."""
        inputs = {v.name: v for v in self._embed.get_inputs()}
        if list(inputs) != ["input_ids"]:
            raise BackendLoadError(f"the embedding graph's inputs are {', '.join(inputs)}; expected input_ids only")
        return _declared_dtype(inputs["input_ids"], _INDEX_TYPES, "embedding")

    def _read_decoder_io(self) -> tuple[DecoderSpec, list[str], list[str]]:
        inputs = {v.name: v for v in self._decoder.get_inputs()}
        layers = sorted({int(m.group(1)) for name in inputs if (m := _PAST_KEY.match(name))})
        if not layers or layers != list(range(len(layers))):
            raise BackendLoadError("decoder graph has no past_key_values.{i}.key inputs numbered from 0")
        past_names = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
        present_names = [f"present.{i}.{kind}" for i in layers for kind in ("key", "value")]
        outputs = {v.name: v for v in self._decoder.get_outputs()}
        missing = [n for n in [*past_names, "inputs_embeds", "attention_mask", "position_ids"] if n not in inputs]
        missing += [n for n in ["logits", *present_names] if n not in outputs]
        if missing:
            raise BackendLoadError(f"decoder graph lacks expected inputs/outputs: {', '.join(missing)}")
        kv_shape = inputs[past_names[0]].shape
        vocab = outputs["logits"].shape[-1]
        if not isinstance(vocab, int):
            raise BackendLoadError("the decoder's logits have no fixed vocabulary size")
        hidden = self._embed.get_outputs()[0].shape[-1]
        spec = DecoderSpec(
            num_layers=len(layers),
            num_kv_heads=int(kv_shape[1]),
            head_dim=int(kv_shape[3]),
            hidden_size=int(hidden),
            vocab_size=vocab,
        )
        return spec, past_names, present_names

    # ------------------------------------------------------------------ properties

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def vision_spec(self) -> VisionSpec:
        return self._vision_spec

    @property
    def decoder_spec(self) -> DecoderSpec:
        return self._decoder_spec

    # ------------------------------------------------------------------ inference

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        name = self._vision.get_inputs()[0].name
        dtype = _ORT_TO_NUMPY.get(self._vision.get_inputs()[0].type, np.float32)
        (features,) = self._vision.run(None, {name: pixel_values.astype(dtype, copy=False)})
        return features[0]

    def _embed_ids(self, input_ids: np.ndarray) -> np.ndarray:
        ids = input_ids.reshape(1, -1).astype(self._ids_dtype, copy=False)
        (embeds,) = self._embed.run(None, {"input_ids": ids})
        return embeds

    def prefill(
        self,
        input_ids: np.ndarray,
        image_features: np.ndarray | None,
        image_token_id: int,
        image_key: str | None = None,
        reserve: int = 0,
    ) -> OrtDecoderState:
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        self._check_prompt_length(input_ids.size)
        embeds = self._embed_ids(input_ids).astype(self._embeds_dtype, copy=False)
        image_positions = np.flatnonzero(input_ids == image_token_id)
        if image_features is not None or image_positions.size:
            n_features = 0 if image_features is None else image_features.shape[0]
            if image_positions.size != n_features:
                raise BackendInputError(
                    f"the prompt has {image_positions.size} image tokens but the image gave {n_features} features"
                )
            embeds[0, image_positions] = image_features
        capacity = input_ids.size + max(reserve, 1)
        split = int(image_positions[-1]) + 1 if image_positions.size else 0
        if image_key is None or not 0 < split < input_ids.size or self.prefix_cache.max_bytes == 0:
            return self._advance(self._new_state(capacity), embeds)
        # The prompt up to and including the image is often repeated (a new question about the
        # same photo): its KV cache is kept, and only the rest of the prompt is run.
        key = (image_key, input_ids[:split].tobytes())
        prefix = self.prefix_cache.get_or_compute(key, lambda: self._advance(self._new_state(split), embeds[:, :split]))
        return self._advance(self._continue(prefix, capacity), embeds[:, split:])

    def _check_prompt_length(self, n_tokens: int) -> None:
        if n_tokens == 0:
            raise BackendInputError("the prompt is empty")
        if self._context_length and n_tokens >= self._context_length:
            raise BackendInputError(
                f"the prompt has {n_tokens} tokens; the model's context holds {self._context_length}"
            )

    def decode_step(self, state: DecoderState, token_id: int) -> np.ndarray:
        assert isinstance(state, OrtDecoderState)
        if self._context_length and state.length >= self._context_length:
            raise BackendInputError(f"the model's context of {self._context_length} tokens is full")
        embeds = self._embed_ids(np.array([token_id], dtype=np.int64)).astype(self._embeds_dtype, copy=False)
        if state.capacity is not None and state.length == state.capacity:  # more than the prefill reserved
            capacity = min(state.capacity * 2, self._context_length or state.capacity * 2)
            state.past, state.capacity = self._resized(state, capacity), capacity
        return self._advance(state, embeds).last_logits

    # ------------------------------------------------------------------ the KV cache

    def _new_state(self, capacity: int) -> OrtDecoderState:
        """An empty cache; preallocated for `capacity` positions when the decoder writes in place."""
        in_place = self.fused_attention_layers > 0
        return OrtDecoderState(
            past=[self._as_ort(self._kv_array(capacity if in_place else 0)) for _ in self._past_names],
            length=0,
            last_logits=np.empty(0, dtype=np.float32),
            capacity=capacity if in_place else None,
        )

    def _kv_array(self, positions: int) -> np.ndarray:
        """One layer's keys or values for `positions` positions, zeroed."""
        spec = self._decoder_spec
        return np.zeros((1, spec.num_kv_heads, positions, spec.head_dim), dtype=self._kv_dtype)

    def _as_ort(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self._device, 0)

    def _continue(self, prefix: OrtDecoderState, capacity: int) -> OrtDecoderState:
        """A new request's cache starting from a cached prefix, which stays unchanged."""
        if prefix.capacity is None:  # read-only inputs to the next step: shared, not copied
            return OrtDecoderState(list(prefix.past), prefix.length, prefix.last_logits)
        return OrtDecoderState(self._resized(prefix, capacity), prefix.length, prefix.last_logits, capacity)

    def _resized(self, state: OrtDecoderState, capacity: int) -> list[ort.OrtValue]:
        """`state`'s filled positions copied into new caches of `capacity` positions."""
        past = []
        for value in state.past:
            buffer = self._kv_array(capacity)
            buffer[:, :, : state.length] = value.numpy()[:, :, : state.length]
            past.append(self._as_ort(buffer))
        return past

    def _advance(self, state: OrtDecoderState, embeds: np.ndarray) -> OrtDecoderState:
        """Run `embeds` after what `state` holds; update `state` and return it."""
        new_tokens = embeds.shape[1]
        total = state.length + new_tokens
        binding = self._decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        self._feeds.bind(binding, state.length, total)
        for name, value in zip(self._past_names, state.past, strict=True):
            binding.bind_ortvalue_input(name, value)
        # ORT writes the logits straight into this buffer (no second copy of a [seq, vocab]
        # block when the graph computes every position's), and only the last row is kept.
        rows = 1 if self.last_position_logits else new_tokens
        logits = np.empty((1, rows, self._decoder_spec.vocab_size), dtype=self._logits_dtype)
        binding.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        for name, value in zip(self._present_names, state.past, strict=True):
            if state.capacity is None:
                binding.bind_output(name, self._device)
            else:  # GroupQueryAttention appends in place when past and present are one buffer
                binding.bind_ortvalue_output(name, value)
        self._decoder.run_with_iobinding(binding)
        if state.capacity is None:
            state.past = list(binding.get_outputs()[1:])
        state.length = total
        # A copy of one row: a view would keep the whole [seq, vocab] block alive with the state.
        state.last_logits = np.array(logits[0, -1], dtype=np.float32)
        return state

    def close(self) -> None:
        # The sessions stay: a generation still finishing may use them; they go with the backend.
        self.prefix_cache.clear()


def _log_graph_choice(files: ModelFiles) -> None:
    """Which file each session uses; a WARNING where it is not in the requested precision."""
    for graph in GRAPHS:
        path, found = files.graphs[graph].relative_to(files.root), files.graph_precisions[graph]
        if found == files.requested_precision:
            log.info("%s graph: %s (%s)", graph, path, found)
        else:
            log.warning(
                "%s graph: %s (%s): %s has no %s %s graph",
                graph,
                path,
                found,
                files.root,
                files.requested_precision,
                graph,
            )


def _shapes(values: Sequence[Any]) -> str:
    return ", ".join(f"{value.name} {list(value.shape)}" for value in values) or "nothing"


def _dtype_of(values: Sequence[Any], name: str) -> type:
    """The numpy type of a graph's float input or output called `name` (embeddings, KV cache, logits)."""
    for value in values:
        if value.name == name:
            if value.type not in _FLOAT_TYPES:
                raise BackendLoadError(f"{name} is {value.type}; this engine handles {' or '.join(_FLOAT_TYPES)}")
            return _ORT_TO_NUMPY[value.type]
    raise BackendLoadError(f"graph has no input or output named {name!r}")


def _state_bytes(state: OrtDecoderState) -> int:
    return sum(value.tensor_size_in_bytes() for value in state.past) + state.last_logits.nbytes


def _file_bytes(path: Path) -> int:
    """A graph's size with its external-data side files (``X.onnx_data``, ``X.onnx.data``)."""
    return sum(p.stat().st_size for p in graph_files(path))
