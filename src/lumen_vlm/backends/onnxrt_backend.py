"""FastVLM on ONNX Runtime: three sessions, IOBinding, and a per-request KV cache.

A fourth session, where the model files name one (`ModelFiles.graphs["prefill"]`), is a second
decoder graph of the same model in another precision that runs prompts: int8 matmuls prefill
faster than q4 ones, which decode faster. Both write the one KV cache.

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
from typing import Any, Literal

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
# Runs of at least this many tokens go through the prompt graph, where there is one. Shorter ones
# read the weights for few rows, and the decoder's smaller weights (q4 against int8) win there;
# on an AVX2-only CPU the crossover lay between 4 and 16 rows (`benchmarks/kernel_checks.py
# prefill-graphs`, benchmarks/RESULTS.md).
PREFILL_GRAPH_MIN_TOKENS = 8
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


@dataclass(frozen=True)
class DecoderGraph:
    """One decoder session and how to run it."""

    session: ort.InferenceSession
    role: Literal["decode", "prefill"]  # part of its KV bindings' key on a cache
    precision: str
    spec: DecoderSpec
    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    feeds: DecoderFeeds
    kv_dtype: type
    embeds_dtype: type
    logits_dtype: type
    last_position_logits: bool  # a run's logits cover its last position only
    rewrites: DerivedDecoder | None  # what was rewritten (graphs/decoder.py); None: run as exported

    @property
    def fused_attention_layers(self) -> int:
        return self.rewrites.fused_attention_layers if self.rewrites else 0

    def cache_layout(self) -> tuple[object, ...]:
        """What a second graph must share with this one to read and write its KV cache."""
        providers = tuple(self.session.get_providers())  # where its KV tensors live
        return (
            self.spec,
            self.past_names,
            self.present_names,
            self.kv_dtype,
            self.fused_attention_layers > 0,
            providers,
        )


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
        try:
            self._ids_dtype = self._read_ids_dtype()
        except BackendLoadError as exc:
            raise BackendLoadError(f"{files.root}: {exc}") from exc
        self._decoder = self._load_decoder(files, "decoder", "decode", options)
        # The graph prompts run through: the decoder itself, unless the files name a second one.
        self._prefill = self._decoder
        if "prefill" in files.graphs:
            self._prefill = self._load_decoder(files, "prefill", "prefill", options)
            self._check_shares_cache(files)
        active = tuple(self._decoder.session.get_providers())
        self._device = _device_type(active)
        image_size, image_tokens, feature_width = self._read_vision_io(files.graphs["vision"])
        decoder = self._decoder.spec
        if feature_width != decoder.hidden_size:
            raise BackendLoadError(
                f"{files.root}: the vision encoder gives {feature_width}-wide image features, but the decoder takes "
                f"{decoder.hidden_size}-wide embeddings: the graphs are not of one model"
            )
        self._graph_spec = GraphSpec(image_size, image_tokens, decoder)
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
            "(%d with their residual Add), %d projections joined; prompts through the %s decoder",
            files.root.name,
            files.precision,
            ", ".join(active),
            self._info.load_time_ms,
            "fused" if self.fused_attention_layers else "as exported",
            rewrites.packed_attention_layers if (rewrites := self._decoder.rewrites) else 0,
            self.fused_norms,
            rewrites.fused_residual_adds if rewrites else 0,
            rewrites.fused_projections if rewrites else 0,
            self._prefill.precision,
        )

    @property
    def fused_attention_layers(self) -> int:
        """How many layers' attention runs as one fused kernel (0: as the graph spells it out);
        with it, each request's KV cache is allocated once and written in place."""
        return self._decoder.fused_attention_layers

    @property
    def fused_norms(self) -> int:
        """RMS norms run as one kernel each."""
        return self._decoder.rewrites.fused_norms if self._decoder.rewrites else 0

    @property
    def last_position_logits(self) -> bool:
        """Whether a prompt's run computes its last position's logits only."""
        return self._prefill.last_position_logits

    @property
    def prefill_precision(self) -> str:
        """The precision of the decoder graph that prompts run through."""
        return self._prefill.precision

    # ------------------------------------------------------------------ loading

    def _open(self, path: Path, options: ort.SessionOptions, reuse_optimized: bool = True) -> ort.InferenceSession:
        try:
            if self._graph_cache is not None and reuse_optimized and self._cpu_only:
                return self._graph_cache.open(path, options, self._providers)
            return ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as exc:  # ORT raises several unrelated types: not ONNX, missing weights, bad graph
            raise BackendLoadError(f"cannot load {path}: {exc}") from exc

    def _load_decoder(
        self, files: ModelFiles, graph: str, role: Literal["decode", "prefill"], options: ort.SessionOptions
    ) -> DecoderGraph:
        """A decoder graph of `files` ("decoder" or "prefill"), opened and read."""
        session, rewrites = self._open_decoder(files.graphs[graph], options)
        try:
            spec, past_names, present_names = self._read_decoder_io(session)
            inputs, outputs = session.get_inputs(), session.get_outputs()
            feeds = read_decoder_feeds({v.name: v for v in inputs})
            return DecoderGraph(
                session=session,
                role=role,
                precision=files.graph_precisions[graph],
                spec=spec,
                past_names=tuple(past_names),
                present_names=tuple(present_names),
                feeds=feeds,
                kv_dtype=_dtype_of(inputs, past_names[0]),
                embeds_dtype=_dtype_of(inputs, NAMES.inputs_embeds),
                logits_dtype=_dtype_of(outputs, NAMES.logits),
                # num_logits_to_keep = 1 makes the graph itself compute the last position's logits only.
                last_position_logits=(rewrites is not None and rewrites.last_position_logits)
                or feeds.logits_to_keep is not None,
                rewrites=rewrites,
            )
        except (BackendLoadError, ValueError, TypeError, IndexError) as exc:  # e.g. int() of a dynamic dimension
            raise BackendLoadError(
                f"{files.root}: the embedding and decoder graphs' inputs and outputs are not a FastVLM export's "
                f"({files.graphs[graph].name}): {exc}"
            ) from exc

    def _check_shares_cache(self, files: ModelFiles) -> None:
        """BackendLoadError unless the prompt graph reads and writes the decoder's KV cache as it does."""
        if self._prefill.cache_layout() != self._decoder.cache_layout():
            raise BackendLoadError(
                f"{files.root}: the {self._prefill.precision} decoder graph for prompts "
                f"({files.graphs['prefill'].name}) does not share a KV cache with the {self._decoder.precision} "
                f"decoder ({files.graphs['decoder'].name}): their layers, KV tensors, types, attention "
                "fusion or providers differ"
            )

    def _open_decoder(
        self, source: Path, options: ort.SessionOptions
    ) -> tuple[ort.InferenceSession, DerivedDecoder | None]:
        """(decoder session, what was rewritten in it, or None where it runs as exported).

        Not ORT's saved optimized decoder: its memory-mapped weights are not pre-packed for the
        GEMM kernels, and decoding measured ~18% slower that way. A rewritten copy (see
        OptimizedGraphCache.derived_decoder) is used when one can be made."""
        derived = self._derived_decoder(source)
        if derived is not None:
            try:
                session = self._open(derived.path, options, reuse_optimized=False)
            except BackendLoadError as exc:  # a damaged copy: drop it, the source still works
                derived.discard(exc)
            else:
                return session, derived
        return self._open(source, options, reuse_optimized=False), None

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

    def _read_decoder_io(self, session: ort.InferenceSession) -> tuple[DecoderSpec, list[str], list[str]]:
        inputs = {v.name: v for v in session.get_inputs()}
        layers = sorted({layer for name in inputs if (layer := NAMES.past_layer(name)) is not None})
        if not layers or layers != list(range(len(layers))):
            first = ", ".join(NAMES.past(0))
            raise BackendLoadError(f"decoder graph has no KV cache inputs ({first}, ...) numbered from 0")
        past_names = [name for i in layers for name in NAMES.past(i)]
        present_names = [name for i in layers for name in NAMES.present(i)]
        outputs = {v.name: v for v in session.get_outputs()}
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
        return embeds[0].astype(self._decoder.embeds_dtype, copy=False)

    def new_kv_cache(self, slots: int, slot_tokens: int) -> KVCache:
        spec, graph = self._graph_spec.decoder, self._decoder
        shape = (slots, slot_tokens, spec.num_kv_heads, spec.head_dim, len(graph.past_names), graph.kv_dtype)
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
        graph = self._graph_for(new_tokens)
        embeds = embeds.astype(graph.embeds_dtype, copy=False)
        if isinstance(cache, SharedSlots):
            logits = self._forward_shared(graph, cache, slots, embeds)
        else:
            assert isinstance(cache, SeparateSlots)
            logits = np.stack(
                [self._forward_separate(graph, cache, slot, embeds[row : row + 1]) for row, slot in enumerate(slots)]
            )
        for slot in slots:
            cache.lengths[slot] += new_tokens
        return logits

    def _graph_for(self, new_tokens: int) -> DecoderGraph:
        """The prompt graph for a run of PREFILL_GRAPH_MIN_TOKENS or more, the decoder otherwise."""
        return self._prefill if new_tokens >= PREFILL_GRAPH_MIN_TOKENS else self._decoder

    def _forward_shared(
        self, graph: DecoderGraph, cache: SharedSlots, slots: Sequence[int], embeds: np.ndarray
    ) -> np.ndarray:
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
        binding = self._kv_binding(graph, cache, first, rows)
        binding.bind_cpu_input(NAMES.inputs_embeds, np.ascontiguousarray(batch_embeds))
        graph.feeds.bind(binding, lengths, embeds.shape[1])
        logits = self._bind_logits(graph, binding, rows, embeds.shape[1])
        graph.session.run_with_iobinding(binding)
        last = logits[:, -1] if in_order else logits[list(slots), -1]
        return np.array(last, dtype=np.float32)

    def _kv_binding(self, graph: DecoderGraph, cache: SharedSlots, first: int, rows: int) -> ort.IOBinding:
        """A binding of `graph` with rows first..first+rows of every KV buffer bound as past and
        present, made once per graph and row range of a cache and kept on it. The buffers never
        move and their shapes are fixed, so only the embeddings, the feeds and the logits change
        per run; binding the 2 x layers KV blocks anew for every token cost about 10% of a q4
        step (27.8 against 25.1 ms, one A/B on an AVX2-only AMD EPYC)."""
        key = (graph.role, first, rows)
        binding = cache.bindings.get(key)
        if binding is None:
            binding = graph.session.io_binding()
            for past_name, present_name, buffer in zip(
                graph.past_names, graph.present_names, cache.buffers, strict=True
            ):
                block = buffer[first : first + rows]
                # GroupQueryAttention appends in place when past and present are one buffer.
                for bind, name in ((binding.bind_input, past_name), (binding.bind_output, present_name)):
                    bind(name, "cpu", 0, block.dtype, list(block.shape), block.ctypes.data)
            cache.bindings[key] = binding
        return binding

    def _forward_separate(self, graph: DecoderGraph, cache: SeparateSlots, slot: int, embeds: np.ndarray) -> np.ndarray:
        """One slot's run: its past tensors in, the presents (the next past) out, on the device."""
        binding = graph.session.io_binding()
        binding.bind_cpu_input(NAMES.inputs_embeds, np.ascontiguousarray(embeds))
        graph.feeds.bind(binding, [cache.lengths[slot]], embeds.shape[1])
        for name, value in zip(graph.past_names, cache.past[slot], strict=True):
            binding.bind_ortvalue_input(name, value)
        logits = self._bind_logits(graph, binding, 1, embeds.shape[1])
        for name in graph.present_names:
            binding.bind_output(name, self._device)
        graph.session.run_with_iobinding(binding)
        cache.past[slot] = list(binding.get_outputs()[1:])
        # A copy of one row: a view would keep the whole [seq, vocab] block alive.
        return np.array(logits[0, -1], dtype=np.float32)

    def _bind_logits(self, graph: DecoderGraph, binding: ort.IOBinding, rows: int, new_tokens: int) -> np.ndarray:
        """ORT writes the logits straight into this buffer (no second copy of a [seq, vocab]
        block when the graph computes every position's)."""
        positions = 1 if graph.last_position_logits else new_tokens
        logits = np.empty((rows, positions, self._graph_spec.decoder.vocab_size), dtype=graph.logits_dtype)
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
    if "prefill" in files.graphs:
        path, found = files.graphs["prefill"].relative_to(files.root), files.graph_precisions["prefill"]
        log.info("prefill graph (prompts): %s (%s)", path, found)


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
