"""Rewrites a decoder graph's RMS norms into ONNX Runtime's SimplifiedLayerNormalization.

transformers' Qwen2RMSNorm, ``weight * x * rsqrt(mean(x**2) + eps)``, exports as seven nodes
(Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) that ORT's own fusion does not recognise,
since it looks for a Div. As one SimplifiedLayerNormalization node each, FastVLM-0.5B's 49
norms save about 3% of a q4 decode step.

Each norm found is run both ways on random input before anything changes; a norm that does
not match, or does not compute the same numbers, is left as it is.

`fuse_residual_adds` then moves the residual Add before a norm into it: Add and
SimplifiedLayerNormalization become one SkipSimplifiedLayerNormalization, whose fourth output
is the sum the next residual reads (48 Adds fewer in FastVLM-0.5B, onnxruntime-genai's layout).
ONNX Runtime 1.32's own optimizer left these Adds as they were (its profile of the q4 decoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .graph_rewrite import (
    MS_DOMAIN,
    FusionUnsupported,
    GraphIndex,
    allowed_error,
    attribute,
    cut_session,
    ms_opset_if_missing,
    replace_nodes,
    rewrite_error,
    small_session,
)

if TYPE_CHECKING:  # onnx itself is imported only when a graph is rewritten (see decoder.py)
    import onnx


@dataclass(frozen=True)
class _Norm:
    source: str  # x
    weight: str  # the per-channel scale, an initializer
    epsilon: float
    output: str
    nodes: tuple[onnx.NodeProto, ...]  # the seven nodes it replaces


def _scalar(graph: GraphIndex, name: str) -> float | None:
    from onnx import numpy_helper

    init = graph.initializers.get(name)
    if init is None:
        return None
    value = numpy_helper.to_array(init)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input node that is not `name`."""
    inputs = list(node.input)
    return inputs[1 - inputs.index(name)] if len(inputs) == 2 and name in inputs else None


def _chain_after(graph: GraphIndex, node: onnx.NodeProto, op_types: list[str]) -> list[onnx.NodeProto] | None:
    """The nodes of `op_types` that follow `node`, each the one reader of the one before's
    output; None where the graph differs."""
    chain: list[onnx.NodeProto] = []
    for op_type in op_types:
        found = graph.read_only_by((chain[-1] if chain else node).output[0], op_type)
        if found is None:
            return None
        chain.append(found)
    return chain


def _norm_at(graph: GraphIndex, mean: onnx.NodeProto) -> _Norm | None:
    """The RMS norm whose ReduceMean is `mean`, or None if it is not one."""
    square = graph.producer.get(mean.input[0])
    if square is None or square.op_type != "Pow" or _scalar(graph, square.input[1]) != 2.0:
        return None
    if graph.read_only_by(square.output[0], "ReduceMean") is not mean:
        return None
    chain = _chain_after(graph, mean, ["Add", "Sqrt", "Reciprocal", "Mul", "Mul"])
    if chain is None:
        return None
    add, _, reciprocal, normalize, scale = chain
    source = square.input[0]
    epsilon_name = _other(add, mean.output[0])
    epsilon = _scalar(graph, epsilon_name) if epsilon_name is not None else None
    weight = _other(scale, normalize.output[0])
    if epsilon is None or weight is None or _other(normalize, reciprocal.output[0]) != source:
        return None
    init = graph.initializers.get(weight)
    if init is None or len(init.dims) != 1:
        return None
    return _Norm(source, weight, epsilon, scale.output[0], (square, mean, *chain))


def _fused_node(norm: _Norm, index: int) -> onnx.NodeProto:
    from onnx import helper

    return helper.make_node(
        "SimplifiedLayerNormalization",
        [norm.source, norm.weight],
        [norm.output],
        name=f"lumen_rms_norm_{index}",
        axis=-1,
        epsilon=norm.epsilon,
        stash_type=1,
    )


def _reproduces(model: onnx.ModelProto, graph: GraphIndex, norm: _Norm, fused: onnx.NodeProto) -> bool:
    """Whether the fused node gives the graph's numbers on random input."""
    from onnx import helper

    width = int(graph.initializers[norm.weight].dims[0])
    elem_type = graph.initializers[norm.weight].data_type
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    # Rows of ordinary scale, and one so small that epsilon decides its result.
    x = np.random.default_rng(0).standard_normal((1, 5, width)) * np.array([1, 1, 1, 10, 1e-4])[None, :, None]
    x = x.astype(dtype)
    try:
        spelled_out = cut_session(model, graph, [norm.output], {norm.source: elem_type})
        inputs = [helper.make_tensor_value_info(norm.source, elem_type, None)]
        one_node = small_session(model, [fused], inputs, [norm.output], [graph.initializers[norm.weight]])
        (want,) = spelled_out.run(None, {norm.source: x})
        (got,) = one_node.run(None, {norm.source: x})
    except Exception:  # ORT cannot build or run either piece: not a norm this rewrite knows
        return False
    return rewrite_error(want, got) <= allowed_error(dtype)


def fuse_rms_norms(model: onnx.ModelProto) -> int:
    """Rewrite `model` (an onnx ModelProto, in place) so each RMS norm it recognises and
    reproduces is one SimplifiedLayerNormalization node; return how many."""
    graph = GraphIndex(model.graph)
    fused: list[tuple[_Norm, onnx.NodeProto]] = []
    for mean in [node for node in graph.nodes if node.op_type == "ReduceMean"]:
        norm = _norm_at(graph, mean)
        if norm is None:
            continue
        node = _fused_node(norm, len(fused))
        if _reproduces(model, graph, norm, node):
            fused.append((norm, node))
    if not fused:
        return 0
    replaced = {id(node) for norm, _ in fused for node in norm.nodes}
    kept = [node for node in graph.nodes if id(node) not in replaced]
    try:
        replace_nodes(model, kept + [node for _, node in fused])
    except FusionUnsupported:
        return 0
    return len(fused)


# --------------------------------------------------------------------------- residual adds


def _residual_norm(graph: GraphIndex, norm: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Add of two computed values (a residual and a layer's output) that `norm` normalizes,
    or None."""
    add = graph.producer.get(norm.input[0])
    if add is None or add.op_type != "Add" or len(add.input) != 2 or add.output[0] in graph.outputs:
        return None
    if any(name in graph.initializers for name in add.input):  # a bias, not a residual
        return None
    return add


def _skip_norm_node(add: onnx.NodeProto, norm: onnx.NodeProto, index: int) -> onnx.NodeProto:
    """One SkipSimplifiedLayerNormalization: the norm of the sum as output 0 and the sum itself
    (which the next residual reads) as output 3, under the Add's name."""
    from onnx import helper

    return helper.make_node(
        "SkipSimplifiedLayerNormalization",
        [add.input[0], add.input[1], norm.input[1]],
        [norm.output[0], "", "", add.output[0]],
        name=f"lumen_skip_rms_norm_{index}",
        domain=MS_DOMAIN,
        epsilon=attribute(norm, "epsilon"),
    )


def _skip_norm_reproduces(
    model: onnx.ModelProto, graph: GraphIndex, add: onnx.NodeProto, norm: onnx.NodeProto, fused: onnx.NodeProto
) -> bool:
    """Whether the fused node gives the Add's and the norm's numbers on random input."""
    from onnx import helper

    weight = graph.initializers[norm.input[1]]
    width = int(weight.dims[0])
    dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((1, 3, width)).astype(dtype) for name in add.input}
    inputs = [helper.make_tensor_value_info(name, weight.data_type, None) for name in add.input]
    outputs = [norm.output[0], add.output[0]]
    try:
        separate = small_session(model, [add, norm], inputs, outputs, [weight])
        one_node = small_session(model, [fused], inputs, outputs, [weight])
        wants = separate.run(None, feeds)
        gots = one_node.run(None, feeds)
    except Exception:  # ORT cannot build or run either piece: not a pair this rewrite knows
        return False
    return all(rewrite_error(want, got) <= allowed_error(dtype) for want, got in zip(wants, gots, strict=True))


def fuse_residual_adds(model: onnx.ModelProto) -> int:
    """Rewrite `model` (an onnx ModelProto, in place) so each residual Add that a
    SimplifiedLayerNormalization reads is done inside one SkipSimplifiedLayerNormalization with
    it; return how many. Run after fuse_rms_norms, which makes the SimplifiedLayerNormalizations."""
    graph = GraphIndex(model.graph)
    pairs: list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]] = []
    for norm in [node for node in graph.nodes if node.op_type == "SimplifiedLayerNormalization"]:
        add = _residual_norm(graph, norm)
        if add is None or norm.input[1] not in graph.initializers:
            continue
        fused = _skip_norm_node(add, norm, len(pairs))
        if _skip_norm_reproduces(model, graph, add, norm, fused):
            pairs.append((add, norm, fused))
    if not pairs:
        return 0
    replaced = {id(node) for add, norm, _ in pairs for node in (add, norm)}
    kept = [node for node in graph.nodes if id(node) not in replaced]
    try:
        replace_nodes(model, kept + [fused for _, _, fused in pairs])
    except FusionUnsupported:
        return 0
    model.opset_import.extend(ms_opset_if_missing(model.opset_import))
    return len(pairs)
