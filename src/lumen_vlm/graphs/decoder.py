"""The decoder graph the runtime opens: a rewritten copy of the exported one, made once, checked,
and kept in the cache (cache.py) beside ORT's optimized graphs.

Each rewrite is made where the graph allows it:
- logits for the last position only (logits_slice);
- with `fuse_kernels` (for ORT's CPU provider, where they are checked): attention as one
  GroupQueryAttention node a layer (attention_fusion; its rotary table needs the context
  length), RMS norms as SimplifiedLayerNormalization and each residual Add with the norm that
  reads it as SkipSimplifiedLayerNormalization (norm_fusion), sibling projections (q, k, v;
  gate, up) as one matmul each (projection_fusion, after the attention fusion, which reads the
  q, k and v projections' widths), and then the joined q/k/v fed to the attention packed
  (packed_attention).
A graph none applies to, or whose copy ORT cannot load, is recorded as such, so the (large)
source is not parsed again at every start.

onnx is imported only while a copy is written: its import takes about 1.5 s, and a start that
finds its copy saved needs none of it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..backends.ort_runtime import ort
from .attention_fusion import fuse_attention
from .cache import DECODER_KIND, GRAPH_NAME, WEIGHTS_NAME, OptimizedGraphCache
from .graph_rewrite import FusionUnsupported
from .logits_slice import slice_logits_to_last_position
from .norm_fusion import fuse_residual_adds, fuse_rms_norms
from .packed_attention import pack_attention_inputs
from .projection_fusion import fuse_projections

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

UNSUPPORTED_NAME = "unsupported.txt"
MANIFEST_NAME = "derived.json"
# Part of the derived decoder's cache key: raise it when the rewrite changes.
REWRITE_VERSION = 6


@dataclass(frozen=True)
class DerivedDecoder:
    """A rewritten decoder graph and what was rewritten."""

    path: Path
    last_position_logits: bool  # prefill's logits cover the last position only
    fused_attention_layers: int  # layers whose attention is one GroupQueryAttention node
    fused_norms: int = 0  # RMS norms that are one SimplifiedLayerNormalization node
    fused_projections: int = 0  # weight matmuls that went into a sibling's (q/k/v, gate/up)
    fused_residual_adds: int = 0  # residual Adds done inside a SkipSimplifiedLayerNormalization
    packed_attention_layers: int = 0  # layers whose attention reads q, k and v packed

    def discard(self, reason: Exception | str) -> None:
        """Remove this copy from the cache (say, ORT cannot open it any more): the next start
        makes it again."""
        log.warning("discarding %s (%s)", self.path.parent, reason)
        shutil.rmtree(self.path.parent, ignore_errors=True)


def prepare_decoder(
    cache: OptimizedGraphCache, source: Path, *, fuse_kernels: bool = False, context_length: int | None = None
) -> DerivedDecoder | None:
    """The rewritten copy of the decoder graph `source`, made and saved in `cache` the first
    time; None when no rewrite applies, or the copy cannot be made: then `source` is used as it
    is. Never raises: a rewrite is an optimization, not a reason to fail a load.

    `fuse_kernels`: also fuse attention (given the model's `context_length`) and RMS norms;
    only for ORT's CPU provider, on which the fused kernels are checked.
    """
    # The fused kernels are checked against the installed ORT when made: a new ORT, or a
    # new version of the rewrites, makes (and checks) them again.
    fused = f"-fused{context_length}" if fuse_kernels else ""
    target = cache.entry(source, [ort.__version__, str(REWRITE_VERSION), fused], DECODER_KIND)
    if not target.is_dir():
        try:
            cache.write_entry(
                target,
                source.name,
                lambda staging: _save_derived_decoder(source, staging, fuse_kernels, context_length),
            )
        except Exception as exc:  # never a reason to fail a load
            log.warning("using %s as it is (%s)", source.name, exc)
            return None
    return _read_entry(target)


def _read_entry(target: Path) -> DerivedDecoder | None:
    """The saved copy in `target`; None when the entry records that no rewrite applies (it has
    no graph) or is damaged (then it goes)."""
    if not (target / GRAPH_NAME).is_file():
        return None
    try:
        return DerivedDecoder(path=target / GRAPH_NAME, **json.loads((target / MANIFEST_NAME).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("discarding %s (%s)", target, exc)
        shutil.rmtree(target, ignore_errors=True)
        return None


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

    model = onnx.load(str(source))  # with its external weights, if any
    branch = _output_branch(model.graph)
    if branch is not None:
        log.info("%s: no rewrite applies, its outputs come from %s", source.name, branch)
        return None
    manifest: dict[str, int | bool] = {
        "last_position_logits": slice_logits_to_last_position(model, source.name),
        "fused_attention_layers": (
            _rewrite(lambda: fuse_attention(model, context_length), "attention", source.name)
            if fuse_kernels and context_length
            else 0
        ),
        "fused_norms": _rewrite(lambda: fuse_rms_norms(model), "RMS norms", source.name) if fuse_kernels else 0,
    }
    if fuse_kernels:
        # In this order: the residual Adds join the norms the norm fusion made; the projections
        # are found after the attention fusion (which finds q, k and v by their own matmuls);
        # the attention is fed packed once q, k and v are one matmul.
        manifest["fused_residual_adds"] = _rewrite(lambda: fuse_residual_adds(model), "residual adds", source.name)
        manifest["fused_projections"] = _rewrite(lambda: fuse_projections(model), "projections", source.name)
        manifest["packed_attention_layers"] = _rewrite(
            lambda: pack_attention_inputs(model), "attention inputs", source.name
        )
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


def _output_branch(graph: onnx.GraphProto) -> str | None:
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
    try:
        return apply()
    except FusionUnsupported as exc:
        log.info("%s: %s kept as they are (%s)", graph_name, what, exc)
    except Exception as exc:  # a graph shape the rewrite did not foresee: still never fatal
        log.warning("%s: %s kept as they are (unexpected: %r)", graph_name, what, exc)
    return 0
