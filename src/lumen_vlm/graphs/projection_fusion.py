"""Rewrites sibling projections (weight matmuls reading the same value) into one matmul each.

A Qwen2 layer reads its normed input with three projections (q, k, v) and, after attention,
with two more (gate, up). Run as one matmul whose weights are the siblings' side by side,
followed by a Split, a layer makes four weight matmuls instead of seven. At decode each call
is a small one, so fewer of them means less of the executor's and the thread pool's work per
token, and for 4-bit weights (MatMulNBits, accuracy level 4) one quantization of the
activations instead of three.

Both weight forms the decoder comes in are handled:
- MatMul with a float [K, N] initializer (fp32, fp16): the weights are joined along N;
- MatMulNBits (q4): the packed weights, scales and zero points are joined along N, which is
  their first axis; the attributes (K, bits, block size, accuracy level) must agree.
Each fused group is run both ways on random input before anything changes; a group that does
not compute the same numbers is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .graph_rewrite import (
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

NBITS_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


@dataclass(frozen=True)
class _Group:
    source: str  # the value every sibling reads
    nodes: tuple[onnx.NodeProto, ...]
    widths: tuple[int, ...]  # each sibling's N


def _initializer(graph: GraphIndex, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    init = graph.initializers.get(name)
    return None if init is None else numpy_helper.to_array(init)


def _matmul_width(graph: GraphIndex, node: onnx.NodeProto) -> int | None:
    """N of a MatMul by a 2-D float initializer, else None."""
    if len(node.input) != 2:
        return None
    weight = graph.initializers.get(node.input[1])
    return int(weight.dims[1]) if weight is not None and len(weight.dims) == 2 else None


def _nbits_width(graph: GraphIndex, node: onnx.NodeProto) -> int | None:
    """N of a MatMulNBits whose weights, scales and zero points are initializers (no g_idx, no
    bias), else None."""
    if len(node.input) > 4 or not all(name in graph.initializers for name in node.input[1:] if name):
        return None
    width = attribute(node, "N")
    return int(width) if width is not None else None


def _signature(node: onnx.NodeProto) -> tuple[object, ...]:
    """What siblings must share to be one node: the op, and for MatMulNBits its attributes and
    whether it has zero points."""
    if node.op_type == "MatMul":
        return ("MatMul",)
    attrs = tuple(attribute(node, name) for name in NBITS_ATTRIBUTES)
    return ("MatMulNBits", attrs, len(node.input) > 3 and bool(node.input[3]))


def _groups(graph: GraphIndex) -> list[_Group]:
    """Every value read by two or more weight matmuls of one signature."""
    width_of = {"MatMul": _matmul_width, "MatMulNBits": _nbits_width}
    groups = []
    for source, readers in graph.readers.items():
        by_signature: dict[tuple[object, ...], list[tuple[onnx.NodeProto, int]]] = {}
        for node in readers:
            measure = width_of.get(node.op_type)
            width = measure(graph, node) if measure and node.input[0] == source else None
            if width is not None:
                by_signature.setdefault(_signature(node), []).append((node, width))
        for siblings in by_signature.values():
            if len(siblings) > 1:
                nodes, widths = zip(*siblings, strict=True)
                groups.append(_Group(source, tuple(nodes), tuple(widths)))
    return groups


def _joined_initializers(graph: GraphIndex, group: _Group, index: int) -> list[onnx.TensorProto]:
    """The siblings' weights side by side: a float MatMul's along N (axis 1), a MatMulNBits'
    packed inputs along their first axis (which is N)."""
    from onnx import numpy_helper

    first = group.nodes[0]
    positions = [1] if first.op_type == "MatMul" else [i for i in range(1, len(first.input)) if first.input[i]]
    joined = []
    for position in positions:
        parts = [_initializer(graph, node.input[position]) for node in group.nodes]
        if any(part is None for part in parts):
            raise FusionUnsupported(f"{first.name}: input {position} is not an initializer")
        axis = 1 if first.op_type == "MatMul" else 0
        name = f"lumen_projection_{index}_input{position}"
        joined.append(numpy_helper.from_array(np.concatenate(parts, axis=axis), name))
    return joined


def _fused_nodes(group: _Group, index: int, joined: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    from onnx import helper

    first = group.nodes[0]
    fused_output = f"lumen_projection_{index}_output"
    inputs = [group.source, *(tensor.name for tensor in joined)]
    if first.op_type == "MatMul":
        matmul = helper.make_node("MatMul", inputs, [fused_output], name=f"lumen_projection_{index}")
    else:
        attrs = {name: attribute(first, name) for name in NBITS_ATTRIBUTES}
        matmul = helper.make_node(
            "MatMulNBits",
            inputs,
            [fused_output],
            name=f"lumen_projection_{index}",
            domain=first.domain,
            N=sum(group.widths),
            **attrs,
        )
    split = helper.make_node(
        "Split",
        [fused_output, f"lumen_projection_{index}_split"],
        [node.output[0] for node in group.nodes],
        name=f"lumen_projection_{index}_split",
        axis=-1,
    )
    return [matmul, split]


def _split_sizes(group: _Group, index: int) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(group.widths, dtype=np.int64), f"lumen_projection_{index}_split")


def _input_width(graph: GraphIndex, group: _Group) -> int:
    first = group.nodes[0]
    if first.op_type == "MatMulNBits":
        return int(attribute(first, "K"))
    return int(graph.initializers[first.input[1]].dims[0])


def _reproduces(
    model: onnx.ModelProto,
    graph: GraphIndex,
    group: _Group,
    fused: list[onnx.NodeProto],
    new_initializers: list[onnx.TensorProto],
) -> bool:
    """Whether the fused node and its Split give the siblings' numbers on random input."""
    from onnx import TensorProto, helper

    first = group.nodes[0]
    elem_type = TensorProto.FLOAT
    if first.op_type == "MatMul":
        elem_type = graph.initializers[first.input[1]].data_type
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    x = np.random.default_rng(0).standard_normal((1, 3, _input_width(graph, group))).astype(dtype)
    inputs = [helper.make_tensor_value_info(group.source, elem_type, None)]
    outputs = [node.output[0] for node in group.nodes]
    old_initializers = [graph.initializers[name] for node in group.nodes for name in node.input[1:] if name]
    try:
        separate = small_session(model, list(group.nodes), inputs, outputs, old_initializers)
        joined = small_session(model, fused, inputs, outputs, new_initializers)
        wants = separate.run(None, {group.source: x})
        gots = joined.run(None, {group.source: x})
    except Exception:  # ORT cannot build or run either piece: not a group this rewrite knows
        return False
    return all(rewrite_error(want, got) <= allowed_error(dtype) for want, got in zip(wants, gots, strict=True))


def fuse_projections(model: onnx.ModelProto) -> int:
    """Rewrite `model` (an onnx ModelProto, in place) so each group of sibling projections it
    reproduces is one matmul and a Split; return how many matmuls went."""
    graph = GraphIndex(model.graph)
    replaced: set[int] = set()
    added_nodes: list[onnx.NodeProto] = []
    added_initializers: list[onnx.TensorProto] = []
    removed = 0
    for index, group in enumerate(_groups(graph)):
        try:
            joined = _joined_initializers(graph, group, index)
        except FusionUnsupported:
            continue
        sizes = _split_sizes(group, index)
        fused = _fused_nodes(group, index, joined)
        if not _reproduces(model, graph, group, fused, [*joined, sizes]):
            continue
        replaced |= {id(node) for node in group.nodes}
        added_nodes += fused
        added_initializers += [*joined, sizes]
        removed += len(group.nodes) - 1
    if not removed:
        return 0
    model.graph.initializer.extend(added_initializers)
    kept = [node for node in graph.nodes if id(node) not in replaced]
    try:
        replace_nodes(model, kept + added_nodes)
    except FusionUnsupported:
        for _ in added_initializers:
            model.graph.initializer.pop()
        return 0
    return removed
