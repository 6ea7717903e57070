"""Feeds each layer's joined q/k/v projection to GroupQueryAttention as one packed tensor.

After the attention and projection fusions a layer computes q, k and v with one matmul, Splits
its output in three, adds each part's bias, and GroupQueryAttention reads the three parts.
The op also takes them packed: a query input of [batch, seq, (heads + 2 * kv_heads) * head
size] (q, k and v side by side, which is what the joined matmul makes) with key and value
left empty. One Add of the joined biases then replaces a Split and three Adds a layer, and
ORT folds that Add into the MatMulNBits before it. onnxruntime-genai's builder makes the same
graph; a q4 decode step of FastVLM-0.5B spent ~1 ms of ~30 in those Splits and Adds.

Each layer's packed tensor is computed both ways on random input before anything changes: it
must equal the three inputs it replaces, side by side. A layer that differs is kept as it is.
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
    replace_nodes,
    rewrite_error,
    small_session,
)

if TYPE_CHECKING:  # onnx itself is imported only when a graph is rewritten (see decoder.py)
    import onnx


@dataclass(frozen=True)
class _Layer:
    attention: onnx.NodeProto
    split: onnx.NodeProto
    adds: tuple[onnx.NodeProto, ...]  # the bias Adds between the Split and the attention
    biases: tuple[np.ndarray, ...]  # q's, k's and v's


def _bias(graph: GraphIndex, node: onnx.NodeProto, part: str) -> np.ndarray | None:
    """The 1-D initializer that the Add `node` adds to `part`, else None."""
    from onnx import numpy_helper

    if node.op_type != "Add" or len(node.input) != 2 or part not in node.input:
        return None
    init = graph.initializers.get(node.input[1 - list(node.input).index(part)])
    return numpy_helper.to_array(init) if init is not None and len(init.dims) == 1 else None


def _layer_at(graph: GraphIndex, attention: onnx.NodeProto) -> _Layer | None:
    """The Split and bias Adds feeding `attention`'s q, k and v, if they come from one Split in
    its order and nothing else reads them; else None."""
    if len(attention.input) < 3 or not all(attention.input[:3]):
        return None  # already packed
    adds, biases, split = [], [], None
    for index, name in enumerate(attention.input[:3]):
        add = graph.producer.get(name)
        if add is None or graph.read_only_by(name, attention.op_type) is not attention:
            return None
        part = next((value for value in add.input if value in graph.producer), None)
        split = split or (graph.producer.get(part) if part else None)
        bias = _bias(graph, add, part) if part else None
        if split is None or split.op_type != "Split" or bias is None or list(split.output)[index : index + 1] != [part]:
            return None
        if graph.read_only_by(part, "Add") is not add:
            return None
        adds.append(add)
        biases.append(bias)
    if split is None or len(split.output) != 3 or not _splits_last_axis(split):
        return None
    return _Layer(attention, split, tuple(adds), tuple(biases))


def _splits_last_axis(split: onnx.NodeProto) -> bool:
    return attribute(split, "axis") in (-1, 2)


def _packed_nodes(layer: _Layer, index: int) -> tuple[list[onnx.NodeProto], onnx.TensorProto]:
    """The Add of the joined biases, the attention reading its output as packed q/k/v, and the
    joined bias."""
    from onnx import helper, numpy_helper

    prefix = f"lumen_packed_qkv_{index}"
    bias = numpy_helper.from_array(np.concatenate(layer.biases), f"{prefix}_bias")
    add = helper.make_node("Add", [layer.split.input[0], bias.name], [f"{prefix}_output"], name=prefix)
    attention = helper.make_node(
        layer.attention.op_type,
        [add.output[0], "", "", *layer.attention.input[3:]],
        list(layer.attention.output),
        name=layer.attention.name,
        domain=MS_DOMAIN,
    )
    attention.attribute.extend(layer.attention.attribute)
    return [add, attention], bias


def _reproduces(
    model: onnx.ModelProto, graph: GraphIndex, layer: _Layer, add: onnx.NodeProto, bias: onnx.TensorProto
) -> bool:
    """Whether the packed tensor equals q, k and v (biases added) side by side, on random input."""
    from onnx import helper

    source = layer.split.input[0]
    dtype = layer.biases[0].dtype
    elem_type = helper.np_dtype_to_tensor_dtype(dtype)
    width = sum(part.size for part in layer.biases)
    x = np.random.default_rng(0).standard_normal((1, 3, width)).astype(dtype)
    inputs = [helper.make_tensor_value_info(source, elem_type, None)]
    old_nodes = [layer.split, *layer.adds]
    old_initializers = [
        graph.initializers[name] for node in old_nodes for name in node.input if name in graph.initializers
    ]
    try:
        separate = small_session(model, old_nodes, inputs, [node.output[0] for node in layer.adds], old_initializers)
        packed = small_session(model, [add], inputs, [add.output[0]], [bias])
        want = np.concatenate(separate.run(None, {source: x}), axis=-1)
        (got,) = packed.run(None, {source: x})
    except Exception:  # ORT cannot build or run either piece: not a layer this rewrite knows
        return False
    return rewrite_error(want, got) <= allowed_error(dtype)


def pack_attention_inputs(model: onnx.ModelProto) -> int:
    """Rewrite `model` (an onnx ModelProto, in place) so each attention whose q, k and v come
    from one Split is fed packed; return how many layers were."""
    graph = GraphIndex(model.graph)
    replaced: set[int] = set()
    added_nodes: list[onnx.NodeProto] = []
    added_initializers: list[onnx.TensorProto] = []
    for attention in [node for node in graph.nodes if node.op_type == "GroupQueryAttention"]:
        layer = _layer_at(graph, attention)
        if layer is None:
            continue
        nodes, bias = _packed_nodes(layer, len(added_initializers))
        if not _reproduces(model, graph, layer, nodes[0], bias):
            continue
        replaced |= {id(node) for node in (layer.attention, layer.split, *layer.adds)}
        added_nodes += nodes
        added_initializers.append(bias)
    if not added_initializers:
        return 0
    model.graph.initializer.extend(added_initializers)
    kept = [node for node in graph.nodes if id(node) not in replaced]
    try:
        replace_nodes(model, kept + added_nodes)
    except FusionUnsupported:
        del model.graph.initializer[-len(added_initializers) :]
        return 0
    return len(added_initializers)
