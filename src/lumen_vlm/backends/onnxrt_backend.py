"""FastVLM on ONNX Runtime: three sessions, IOBinding, and a per-request KV cache.

Every model fact this module needs is read from the sessions themselves: layer count and
KV shape from the decoder's ``past_key_values.*`` inputs, vocabulary size from its logits,
image size and token count from the vision encoder. Nothing about FastVLM-0.5B is assumed.
They are the graphs' part of the model spec (`graph_spec`, a `model_spec.GraphSpec`); the
tensor names come from `resources.export_names`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..graphs import DerivedDecoder, OptimizedGraphCache, prepare_decoder
from ..resources.export_names import EXPORT_NAMES as NAMES
from ..resources.model_files import GRAPHS, ModelFiles, graph_files
from ..resources.model_spec import DecoderSpec, GraphSpec
from .backend_exceptions import BackendInputError, BackendLoadError
from .base import BackendInfo, BaseFastVLMBackend
from .kv_cache import KVCache, SeparateSlots, SharedSlots, rows_mask, rows_positions
from .ort_runtime import copy_options, ort

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

    def bind(self, binding: ort.IOBinding, lengths: Sequence[int], new_tokens: int) -> None:
        """Bind the inputs for a run of `new_tokens` tokens after each row's `lengths` positions."""
        binding.bind_cpu_input(NAMES.attention_mask, rows_mask(lengths, new_tokens, self.mask_dtype))
        binding.bind_cpu_input(NAMES.position_ids, rows_positions(lengths, new_tokens, self.position_dtype))
        if self.logits_to_keep is not None:
            binding.bind_cpu_input(NAMES.logits_to_keep, self.logits_to_keep)
        if self.cache_branch is not None:
            binding.bind_cpu_input(NAMES.cache_branch, self.cache_branch[max(lengths) > 0])


def read_decoder_feeds(inputs: dict[str, Any]) -> DecoderFeeds:
    """How to feed a decoder session's inputs (name -> NodeArg); BackendLoadError, naming the
    input, for any input this engine cannot feed or a type it cannot give it."""
    known = {NAMES.inputs_embeds, NAMES.attention_mask, NAMES.position_ids, NAMES.logits_to_keep, NAMES.cache_branch}
    unknown = sorted(name for name in inputs if name not in known and NAMES.past_layer(name) is None)
    if unknown:
        raise BackendLoadError(
            f"the decoder graph has inputs this engine does not know how to feed: {', '.join(unknown)}"
        )
    feeds = DecoderFeeds(
        mask_dtype=_declared_dtype(inputs[NAMES.attention_mask], _INDEX_TYPES),
        position_dtype=_declared_dtype(inputs[NAMES.position_ids], _INDEX_TYPES),
    )
    if NAMES.logits_to_keep in inputs:
        arg = inputs[NAMES.logits_to_keep]
        feeds = replace(feeds, logits_to_keep=_single_value(arg, 1, _declared_dtype(arg, _INDEX_TYPES)))
    if NAMES.cache_branch in inputs:
        arg = inputs[NAMES.cache_branch]
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


class FastVLMONNXBackend(BaseFastVLMBackend):
    """Runs the onnx-community three-graph FastVLM export with ONNX Runtime."""

    def __init__(
        self,
        files: ModelFiles,
        providers: Sequence[ProviderSpec] | None = None,
        session_options: ort.SessionOptions | None = None,
        context_length: int | None = None,
        optimized_graph_dir: Path | None = None,
    ) -> None:
        started = time.perf_counter()
        self._providers = list(providers or select_providers("auto"))
        self._graph_cache = OptimizedGraphCache(optimized_graph_dir) if optimized_graph_dir else None
        # ORT's saved optimized graphs hold CPU-specific rewrites: reused with the CPU provider only.
        self._cpu_only = provider_names(self._providers) == ["CPUExecutionProvider"]
        options = session_options or default_session_options()
        _log_graph_choice(files)
        # The vision encoder's activations at 1024 px are hundreds of MB, needed once per new
        # photo: without an arena they are freed after each encode (measured: ~290 MB less
        # resident memory for fp32), at 5-10% of the encode's time (benchmarks/RESULTS.md,
        # "Vision encoder"); the peak-RSS target (files + 25%) is worth that.
        self._vision = self._open(files.graphs["vision"], copy_options(options, enable_cpu_mem_arena=False))
        self._embed = self._open(files.graphs["embed"], options)
        self._context_length = context_length
        # The rewritten decoder in use and what was rewritten (graphs/decoder.py), or None
        # when the decoder runs as exported.
        self._rewrites: DerivedDecoder | None = None
        # Not ORT's saved optimized decoder: its memory-mapped weights are not pre-packed for
        # the GEMM kernels, and decoding measured ~18% slower that way. A rewritten copy (see
        # OptimizedGraphCache.derived_decoder) is used when one can be made.
        # last_position_logits: whether prefill's logits come for the last position only.
        self._decoder, self.last_position_logits = self._open_decoder(files.graphs["decoder"], options)
        active = tuple(self._decoder.get_providers())
        self._device = _device_type(active)
        image_size, image_tokens, feature_width = self._read_vision_io(files.graphs["vision"])
        try:
            decoder, self._past_names, self._present_names = self._read_decoder_io()
            self._feeds = read_decoder_feeds({v.name: v for v in self._decoder.get_inputs()})
            self._ids_dtype = self._read_ids_dtype()
            self._kv_dtype = _dtype_of(self._decoder.get_inputs(), self._past_names[0])
            self._embeds_dtype = _dtype_of(self._decoder.get_inputs(), NAMES.inputs_embeds)
            self._logits_dtype = _dtype_of(self._decoder.get_outputs(), NAMES.logits)
        except (BackendLoadError, ValueError, TypeError, IndexError) as exc:  # e.g. int() of a dynamic dimension
            raise BackendLoadError(
                f"{files.root}: the embedding and decoder graphs' inputs and outputs are not a FastVLM export's: {exc}"
            ) from exc
        if feature_width != decoder.hidden_size:
            raise BackendLoadError(
                f"{files.root}: the vision encoder gives {feature_width}-wide image features, but the decoder takes "
                f"{decoder.hidden_size}-wide embeddings: the graphs are not of one model"
            )
        self._graph_spec = GraphSpec(image_size, image_tokens, decoder)
        # num_logits_to_keep = 1 makes the graph itself compute the last position's logits only.
        self.last_position_logits = self.last_position_logits or self._feeds.logits_to_keep is not None
        self._info = BackendInfo(
            runtime=f"onnxrt-{self._device}",
            providers=active,
            precision=files.precision,
            precisions=tuple(dict.fromkeys([files.precision, *files.graph_precisions.values()])),
            load_time_ms=(time.perf_counter() - started) * 1000.0,
            model_bytes=sum(_file_bytes(p) for p in files.graphs.values()),
            decoder_bytes=_file_bytes(files.graphs["decoder"]),
        )
        log.info(
            "loaded %s (%s, %s) in %.0f ms; attention %s (%d layers packed), %d RMS norms fused "
            "(%d with their residual Add), %d projections joined",
            files.root.name,
            files.precision,
            ", ".join(active),
            self._info.load_time_ms,
            "fused" if self.fused_attention_layers else "as exported",
            self._rewrites.packed_attention_layers if self._rewrites else 0,
            self.fused_norms,
            self._rewrites.fused_residual_adds if self._rewrites else 0,
            self._rewrites.fused_projections if self._rewrites else 0,
        )

    @property
    def fused_attention_layers(self) -> int:
        """How many layers' attention runs as one fused kernel (0: as the graph spells it out);
        with it, each request's KV cache is allocated once and written in place."""
        return self._rewrites.fused_attention_layers if self._rewrites else 0

    @property
    def fused_norms(self) -> int:
        """RMS norms run as one kernel each."""
        return self._rewrites.fused_norms if self._rewrites else 0

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
                derived.discard(exc)
            else:
                self._rewrites = derived
                return session, derived.last_position_logits
        return self._open(source, options, reuse_optimized=False), False

    def _derived_decoder(self, source: Path) -> DerivedDecoder | None:
        if self._graph_cache is None:
            return None
        # The fused kernels are checked against the graph on the CPU provider when made, and
        # are used there only.
        return prepare_decoder(
            self._graph_cache, source, fuse_kernels=self._cpu_only, context_length=self._context_length
        )

    def _read_vision_io(self, path: Path) -> tuple[int, int | None, int]:
        """(image size, token count, feature width): the size and count where the graph fixes them
        (0 / None where it leaves them dynamic)."""
        inputs, outputs = self._vision.get_inputs(), self._vision.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1 or len(outputs[0].shape) != 3:
            raise BackendLoadError(
                f"{path} is not a FastVLM vision encoder: it should take one [batch, 3, height, width] input and "
                f"give one [batch, tokens, hidden] output; it takes {_shapes(inputs)} and gives {_shapes(outputs)}"
            )
        sides = {side for side in inputs[0].shape[2:] if isinstance(side, int)}
        tokens, feature_width = outputs[0].shape[1:]
        if len(sides) > 1 or not isinstance(feature_width, int):
            raise BackendLoadError(
                f"{path}: the vision encoder should take square images and give features of a fixed width; "
                f"it takes {_shapes(inputs)} and gives {_shapes(outputs)}"
            )
        return (sides.pop() if sides else 0), (tokens if isinstance(tokens, int) else None), feature_width

    def _read_ids_dtype(self) -> type:
        """The type the embedding graph declares its input_ids in."""
        inputs = {v.name: v for v in self._embed.get_inputs()}
        if list(inputs) != [NAMES.input_ids]:
            raise BackendLoadError(
                f"the embedding graph's inputs are {', '.join(inputs)}; expected {NAMES.input_ids} only"
            )
        return _declared_dtype(inputs[NAMES.input_ids], _INDEX_TYPES, "embedding")

    def _read_decoder_io(self) -> tuple[DecoderSpec, list[str], list[str]]:
        inputs = {v.name: v for v in self._decoder.get_inputs()}
        layers = sorted({layer for name in inputs if (layer := NAMES.past_layer(name)) is not None})
        if not layers or layers != list(range(len(layers))):
            first = ", ".join(NAMES.past(0))
            raise BackendLoadError(f"decoder graph has no KV cache inputs ({first}, ...) numbered from 0")
        past_names = [name for i in layers for name in NAMES.past(i)]
        present_names = [name for i in layers for name in NAMES.present(i)]
        outputs = {v.name: v for v in self._decoder.get_outputs()}
        wanted_inputs = [*past_names, NAMES.inputs_embeds, NAMES.attention_mask, NAMES.position_ids]
        missing = [n for n in wanted_inputs if n not in inputs]
        missing += [n for n in [NAMES.logits, *present_names] if n not in outputs]
        if missing:
            raise BackendLoadError(f"decoder graph lacks expected inputs/outputs: {', '.join(missing)}")
        kv_shape = inputs[past_names[0]].shape
        vocab = outputs[NAMES.logits].shape[-1]
        if not isinstance(vocab, int):
            raise BackendLoadError("the decoder's logits have no fixed vocabulary size")
        hidden = self._embed.get_outputs()[0].shape[-1]
        decoder = DecoderSpec(
            num_layers=len(layers),
            num_kv_heads=int(kv_shape[1]),
            head_dim=int(kv_shape[3]),
            hidden_size=int(hidden),
            vocab_size=vocab,
        )
        return decoder, past_names, present_names

    # ------------------------------------------------------------------ properties

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def graph_spec(self) -> GraphSpec:
        return self._graph_spec

    # ------------------------------------------------------------------ inference

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        name = self._vision.get_inputs()[0].name
        dtype = _ORT_TO_NUMPY.get(self._vision.get_inputs()[0].type, np.float32)
        (features,) = self._vision.run(None, {name: pixel_values.astype(dtype, copy=False)})
        return features[0]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids).reshape(1, -1).astype(self._ids_dtype, copy=False)
        (embeds,) = self._embed.run(None, {NAMES.input_ids: ids})
        return embeds[0].astype(self._embeds_dtype, copy=False)

    def new_kv_cache(self, slots: int, slot_tokens: int) -> KVCache:
        spec = self._graph_spec.decoder
        shape = (slots, slot_tokens, spec.num_kv_heads, spec.head_dim, len(self._past_names), self._kv_dtype)
        if self.fused_attention_layers:
            return SharedSlots(*shape)
        return SeparateSlots(*shape, device=self._device)

    def forward(self, cache: KVCache, slots: Sequence[int], embeds: np.ndarray) -> np.ndarray:
        if embeds.shape[0] != len(slots) or (len(slots) > 1 and embeds.shape[1] != 1):
            raise BackendInputError("forward takes one row per slot, and one token per row when there are several")
        new_tokens = embeds.shape[1]
        for slot in slots:
            if cache.room(slot) < new_tokens:
                raise BackendInputError(
                    f"the KV slot holds {cache.slot_tokens} tokens; {cache.lengths[slot]} are used "
                    f"and {new_tokens} more do not fit"
                )
        if isinstance(cache, SharedSlots):
            logits = self._forward_shared(cache, slots, embeds)
        else:
            assert isinstance(cache, SeparateSlots)
            logits = np.stack(
                [self._forward_separate(cache, slot, embeds[row : row + 1]) for row, slot in enumerate(slots)]
            )
        for slot in slots:
            cache.lengths[slot] += new_tokens
        return logits

    def _forward_shared(self, cache: SharedSlots, slots: Sequence[int], embeds: np.ndarray) -> np.ndarray:
        """One decoder call for every row, on the shared buffers.

        A single slot is bound alone (a view of its rows of each buffer). Several are run as
        rows 0..max(slots): the buffers' leading rows are one contiguous block, and a row in
        that range that is not asked for (a free slot, or one still prefilling) is fed a
        zero embedding at its own length, so its write lands past what it holds and is
        overwritten by its next real token."""
        first, rows = (slots[0], 1) if len(slots) == 1 else (0, max(slots) + 1)
        lengths = [cache.lengths[first + row] for row in range(rows)]
        in_order = len(slots) == 1 or list(slots) == list(range(rows))
        batch_embeds = embeds
        if not in_order:  # buffer row r is slot r: put each embedding in its slot's row
            batch_embeds = np.zeros((rows, 1, embeds.shape[2]), dtype=embeds.dtype)
            batch_embeds[list(slots)] = embeds
        binding = self._kv_binding(cache, first, rows)
        binding.bind_cpu_input(NAMES.inputs_embeds, np.ascontiguousarray(batch_embeds))
        self._feeds.bind(binding, lengths, embeds.shape[1])
        logits = self._bind_logits(binding, rows, embeds.shape[1])
        self._decoder.run_with_iobinding(binding)
        last = logits[:, -1] if in_order else logits[list(slots), -1]
        return np.array(last, dtype=np.float32)

    def _kv_binding(self, cache: SharedSlots, first: int, rows: int) -> ort.IOBinding:
        """A binding with rows first..first+rows of every KV buffer bound as past and present,
        made once per row range of a cache and kept on it. The buffers never move and their
        shapes are fixed, so only the embeddings, the feeds and the logits change per run;
        binding the 2 x layers KV blocks anew for every token cost about 10% of a q4 step (27.8
        against 25.1 ms, one A/B on an AVX2-only AMD EPYC)."""
        key = (first, rows)
        binding = cache.bindings.get(key)
        if binding is None:
            binding = self._decoder.io_binding()
            for past_name, present_name, buffer in zip(
                self._past_names, self._present_names, cache.buffers, strict=True
            ):
                block = buffer[first : first + rows]
                # GroupQueryAttention appends in place when past and present are one buffer.
                for bind, name in ((binding.bind_input, past_name), (binding.bind_output, present_name)):
                    bind(name, "cpu", 0, block.dtype, list(block.shape), block.ctypes.data)
            cache.bindings[key] = binding
        return binding

    def _forward_separate(self, cache: SeparateSlots, slot: int, embeds: np.ndarray) -> np.ndarray:
        """One slot's run: its past tensors in, the presents (the next past) out, on the device."""
        binding = self._decoder.io_binding()
        binding.bind_cpu_input(NAMES.inputs_embeds, np.ascontiguousarray(embeds))
        self._feeds.bind(binding, [cache.lengths[slot]], embeds.shape[1])
        for name, value in zip(self._past_names, cache.past[slot], strict=True):
            binding.bind_ortvalue_input(name, value)
        logits = self._bind_logits(binding, 1, embeds.shape[1])
        for name in self._present_names:
            binding.bind_output(name, self._device)
        self._decoder.run_with_iobinding(binding)
        cache.past[slot] = list(binding.get_outputs()[1:])
        # A copy of one row: a view would keep the whole [seq, vocab] block alive.
        return np.array(logits[0, -1], dtype=np.float32)

    def _bind_logits(self, binding: ort.IOBinding, rows: int, new_tokens: int) -> np.ndarray:
        """ORT writes the logits straight into this buffer (no second copy of a [seq, vocab]
        block when the graph computes every position's)."""
        positions = 1 if self.last_position_logits else new_tokens
        logits = np.empty((rows, positions, self._graph_spec.decoder.vocab_size), dtype=self._logits_dtype)
        binding.bind_output(NAMES.logits, "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        return logits

    def close(self) -> None:
        """Nothing to release early: the sessions stay while a generation still finishing may use
        them, and go with the backend."""


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


def _file_bytes(path: Path) -> int:
    """A graph's size with its external-data side files (``X.onnx_data``, ``X.onnx.data``)."""
    return sum(p.stat().st_size for p in graph_files(path))
