"""ONNX Runtime's optimized graphs, saved once and reloaded without the optimizer.

Loading a graph normally makes ORT parse every weight into memory and then build fused and
re-laid copies of many of them, keeping both: measured on FastVLM-0.5B's vision encoder at
1024 px, 960 MB resident for a 507 MB file, plus a ~520 MB transient while protobuf parses the
inline weights of the embedding and decoder files. A graph that ORT saved after optimizing,
with its weights in a side file, loads with the optimizer off and its weights memory-mapped:
one copy, no transient, same kernels, same numbers.

The saved graph may hold hardware-specific rewrites, so the cache key names the source file,
the ORT version and the machine; it is used for the CPU provider only.

The decoder is not saved that way (see FastVLMONNXBackend) but rewritten by this project:
`derived_decoder` saves a copy that computes prefill's logits for the last position only and
runs attention as one fused kernel per layer (attention_fusion), each where the graph allows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..resources.model_files import graph_files
from .ort_runtime import ort

log = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"
WEIGHTS_NAME = "model.onnx.data"
UNSUPPORTED_NAME = "unsupported.txt"
MANIFEST_NAME = "derived.json"
DERIVED_SUFFIX = "-decoder"
# Earlier versions' name for the derived decoder: such entries are removed as stale.
LEGACY_DERIVED_SUFFIX = "-last-logits"
# Part of the derived decoder's cache key: raise it when the rewrite changes.
REWRITE_VERSION = 4


@dataclass(frozen=True)
class DerivedDecoder:
    """A rewritten decoder graph and what was rewritten."""

    path: Path
    last_position_logits: bool  # prefill's logits cover the last position only
    fused_attention_layers: int  # layers whose attention is one GroupQueryAttention node
    fused_norms: int = 0  # RMS norms that are one SimplifiedLayerNormalization node


def copy_options(options: ort.SessionOptions, **changes: object) -> ort.SessionOptions:
    """A new SessionOptions with the fields this project sets, then `changes` applied."""
    copy = ort.SessionOptions()
    for name in (
        "graph_optimization_level",
        "intra_op_num_threads",
        "inter_op_num_threads",
        "execution_mode",
        "log_severity_level",
        "enable_cpu_mem_arena",
    ):
        setattr(copy, name, changes.get(name, getattr(options, name)))
    return copy


def _machine_fingerprint() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def source_ids(source: Path) -> tuple[str, str]:
    """(the source graph's path, its version: size and mtime of it and its weight files)."""
    version = []
    for path in graph_files(source):
        stat = path.stat()
        version.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return _digest([str(source.resolve())]), _digest(version)


def environment_id(options: ort.SessionOptions) -> str:
    """Names what the optimized graph depends on besides its source."""
    return _digest([ort.__version__, str(options.graph_optimization_level), _machine_fingerprint()])


class OptimizedGraphCache:
    """Saved optimized graphs under `root`, one directory per source graph and environment."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, source: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
        """A session on the saved optimized graph, saving it first if needed; the source graph
        itself when the cache cannot be used (read-only or full disk, a damaged entry)."""
        path_id, version_id = source_ids(source)
        target = self.root / f"{path_id}-{version_id}-{environment_id(options)}"
        try:
            if not (target / GRAPH_NAME).is_file():
                self._save_optimized(source, options, providers, target)
            return ort.InferenceSession(
                str(target / GRAPH_NAME),
                sess_options=copy_options(options, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                providers=providers,
            )
        except Exception as exc:  # the cache is an optimization: never a reason to fail a load
            log.warning("not using a saved optimized %s (%s)", source.name, exc)
            shutil.rmtree(target, ignore_errors=True)
            return ort.InferenceSession(str(source), sess_options=options, providers=providers)

    def derived_decoder(
        self, source: Path, fuse_kernels: bool = False, context_length: int | None = None
    ) -> DerivedDecoder | None:
        """A faster copy of the decoder graph, saved once; None when no rewrite applies.

        Each rewrite is made where the graph allows it:
        - logits for the last position only: the public graphs compute them for every prompt
          position, a [seq, vocab] product that prefill throws away but for its last row
          (measured: 22% of a q4 prefill). The copy slices the hidden states before the
          output projection; a decode step, one position anyway, is unchanged.
        - with `fuse_kernels` (for ORT's CPU provider, where they are checked): attention as
          one GroupQueryAttention node a layer (attention_fusion; its rotary table needs the
          `context_length`), and RMS norms as SimplifiedLayerNormalization (norm_fusion).
        """
        path_id, version_id = source_ids(source)
        # The fused kernels are checked against the installed ORT when made: a new ORT, or a
        # new version of the rewrites, makes (and checks) them again.
        fused = f"-fused{context_length}" if fuse_kernels else ""
        rewrite_id = _digest([ort.__version__, str(REWRITE_VERSION), fused])
        target = self.root / f"{path_id}-{version_id}-{rewrite_id}{DERIVED_SUFFIX}"
        if not target.is_dir():
            try:
                self._write_staged(
                    target,
                    source.name,
                    lambda staging: _save_derived_decoder(source, staging, fuse_kernels, context_length),
                )
            except Exception as exc:  # never a reason to fail a load
                log.warning("using %s as it is (%s)", source.name, exc)
                return None
        # An entry without a graph records that no rewrite applies to this source, so the
        # (large) source is not parsed again at every start.
        if not (target / GRAPH_NAME).is_file():
            return None
        try:
            return DerivedDecoder(path=target / GRAPH_NAME, **json.loads((target / MANIFEST_NAME).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("discarding %s (%s)", target, exc)
            shutil.rmtree(target, ignore_errors=True)
            return None

    def _save_optimized(self, source: Path, options: ort.SessionOptions, providers: list, target: Path) -> None:
        """Let ORT optimize `source` once and write the result."""

        def save(staging: Path) -> None:
            saving = copy_options(options)
            saving.optimized_model_filepath = str(staging / GRAPH_NAME)
            saving.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS_NAME)
            saving.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(source), sess_options=saving, providers=providers)

        self._write_staged(target, source.name, save)

    def _write_staged(self, target: Path, what: str, write: Callable[[Path], None]) -> None:
        """Write an entry in a staging folder, then rename it into place; concurrent writers race
        harmlessly (the first rename wins)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale(target)
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=self.root))
        try:
            write(staging)
            try:
                os.rename(staging, target)  # atomic; fails if another process got there first
            except OSError:
                pass
            else:
                log.info("saved a derived copy of %s in %s", what, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _remove_stale(self, target: Path) -> None:
        """Drop older entries of the same kind for the same source (another version of its
        files, of ORT, of the machine) and staging folders a killed process left, an hour old."""
        source_prefix = target.name.split("-", 1)[0] + "-"
        kind = _is_derived(target.name)
        hour_ago = time.time() - 3600
        for entry in self.root.iterdir():
            stale_staging = entry.name.startswith(".saving-") and entry.stat().st_mtime < hour_ago
            same_kind = entry.name.startswith(source_prefix) and _is_derived(entry.name) == kind
            if entry != target and (same_kind or stale_staging):
                shutil.rmtree(entry, ignore_errors=True)


def _is_derived(entry_name: str) -> bool:
    return entry_name.endswith((DERIVED_SUFFIX, LEGACY_DERIVED_SUFFIX))


def _logits_projection(graph: object) -> tuple[int, object] | None:
    """(index, node) of the MatMul that projects hidden states to the `logits` output, looking
    through Casts; None for any other shape of graph (e.g. an int8 MatMulInteger chain)."""
    producers = {output: (index, node) for index, node in enumerate(graph.node) for output in node.output}
    found = producers.get("logits")
    while found is not None and found[1].op_type == "Cast":
        found = producers.get(found[1].input[0])
    if found is None or found[1].op_type not in ("MatMul", "MatMulNBits"):
        return None
    return found


def _save_derived_decoder(source: Path, staging: Path, fuse_kernels: bool, context_length: int | None) -> None:
    manifest = _write_rewritten(source, staging / GRAPH_NAME, fuse_kernels, context_length)
    if manifest is None:
        (staging / UNSUPPORTED_NAME).write_text("no rewrite applies to this graph\n")
        return
    try:  # a copy ORT cannot load is recorded as such, not rebuilt at every start
        ort.InferenceSession(str(staging / GRAPH_NAME), _trial_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        log.warning("%s: the rewritten copy does not load (%s); using the graph as it is", source.name, exc)
        for path in (staging / GRAPH_NAME, staging / WEIGHTS_NAME):
            path.unlink(missing_ok=True)
        (staging / UNSUPPORTED_NAME).write_text(f"the rewritten copy did not load: {exc}\n")
        return
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest))


def _write_rewritten(
    source: Path, target: Path, fuse_kernels: bool, context_length: int | None
) -> dict[str, int | bool] | None:
    """Write `source` with every rewrite that applies to `target`; what was done, or None
    (nothing written) when none applies."""
    import onnx

    from .attention_fusion import fuse_attention
    from .norm_fusion import fuse_rms_norms

    model = onnx.load(str(source))  # with its external weights, if any
    branch = _output_branch(model.graph)
    if branch is not None:
        log.info("%s: no rewrite applies, its outputs come from %s", source.name, branch)
        return None
    manifest = {
        "last_position_logits": _slice_before_logits(model, source.name),
        "fused_attention_layers": (
            _rewrite(lambda: fuse_attention(model, context_length), "attention", source.name)
            if fuse_kernels and context_length
            else 0
        ),
        "fused_norms": _rewrite(lambda: fuse_rms_norms(model), "RMS norms", source.name) if fuse_kernels else 0,
    }
    if not any(manifest.values()):
        return None
    onnx.save(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS_NAME,
        size_threshold=1024,
    )
    return manifest


def _output_branch(graph: object) -> str | None:
    """What makes the graph's outputs when it is a control-flow node (an optimum merged
    decoder's If on use_cache_branch); None when ordinary nodes do. The rewrites look at the
    top-level graph only, so such a graph is used as it is."""
    producers = {output: node for node in graph.node for output in node.output}
    for output in graph.output:
        node = producers.get(output.name)
        if node is not None and node.op_type in ("If", "Loop", "Scan"):
            condition = f" on {node.input[0]}" if node.op_type == "If" else ""
            return f"a control-flow {node.op_type} node{condition}"
    return None


def _trial_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    return options


def _rewrite(apply: Callable[[], int], what: str, graph_name: str) -> int:
    """Run one rewrite; a graph it does not fit keeps that part as it is."""
    from .graph_rewrite import FusionUnsupported

    try:
        return apply()
    except FusionUnsupported as exc:
        log.info("%s: %s kept as they are (%s)", graph_name, what, exc)
    except Exception as exc:  # a graph shape the rewrite did not foresee: still never fatal
        log.warning("%s: %s kept as they are (unexpected: %r)", graph_name, what, exc)
    return 0


def _slice_before_logits(model: object, graph_name: str) -> bool:
    """Make `model` compute logits for the last position only; False (unchanged) when its
    output projection is not a MatMul over the hidden states."""
    import numpy as np
    from onnx import helper, numpy_helper

    found = _logits_projection(model.graph)
    if found is None:
        log.info("%s: logits do not come from a MatMul over the hidden states; not sliced", graph_name)
        return False
    index, projection = found
    hidden = projection.input[0]
    bounds = {
        "lumen_last_position_start": np.array([-1], dtype=np.int64),
        "lumen_last_position_end": np.array([np.iinfo(np.int64).max], dtype=np.int64),
        "lumen_last_position_axis": np.array([1], dtype=np.int64),
    }
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in bounds.items())
    last = hidden + "_last_position"
    model.graph.node.insert(
        index, helper.make_node("Slice", [hidden, *bounds], [last], name="lumen_keep_last_position")
    )
    projection.input[0] = last
    return True
