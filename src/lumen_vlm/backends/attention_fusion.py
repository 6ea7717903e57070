"""Rewrites a decoder graph's attention into ONNX Runtime's fused GroupQueryAttention.

The public exports spell attention out op by op: per layer, a rotary embedding, the
concatenation of past and new keys, the repetition of KV heads, two MatMuls, a mask and a
softmax, about forty small nodes. On a 2-core CPU decoding one token at a time, those nodes
and the executor's work between them cost as much as the weights' MatMuls (measured on
FastVLM-0.5B q4: ~1,300 such nodes, ~17 of 18 ms a step besides the MatMuls' 10).
``com.microsoft.GroupQueryAttention`` does all of it in one kernel, rotary included.

The rewrite is found from the graph's interface, not from the exporter's node names: for
layer i, ``present.i.key`` / ``present.i.value`` are a Concat of the past and the new keys /
values, the new ones are a Reshape + Transpose of a projection's output, and the attention
result is the Reshape that follows the MatMul reading the values. Everything between goes.
The rotary tables are produced by running the graph's own cos/sin nodes, so their numbers
are exactly the original's. `fuse_attention` refuses (FusionUnsupported) any graph it does
not recognise; the caller then keeps the graph as it is.

The fused graph assumes what this engine always feeds: one sequence, an all-ones attention
mask, and positions counting from 0 (GroupQueryAttention derives positions from the mask).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

MS_DOMAIN = "com.microsoft"
_TO_BNSH = [0, 2, 1, 3]


class FusionUnsupported(Exception):
    """The graph's attention is not the shape this rewrite knows."""


@dataclass(frozen=True)
class _Layer:
    index: int
    query: str  # projection outputs, [batch, seq, heads * head_dim]
    key: str
    value: str
    output: str  # attention result, [batch, seq, heads * head_dim], read by the output projection
    cos: str  # the graph's rotary tables, [batch, seq, head_dim]
    sin: str


class _Graph:
    """Who produces and who reads each value of an onnx GraphProto."""

    def __init__(self, graph: object) -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def made_by(self, name: str, op_type: str) -> object:
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            raise FusionUnsupported(f"{name} is not made by a {op_type}")
        return node

    def upstream(self, names: Iterable[str], stop: set[str] = frozenset()) -> list:
        """Nodes that `names` depend on, not looking past the values in `stop`."""
        seen: dict[int, object] = {}
        queue = deque(n for n in names if n not in stop)
        while queue:
            node = self.producer.get(queue.popleft())
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            queue.extend(n for n in node.input if n and n not in stop)
        return list(seen.values())


def _attribute(node: object, name: str) -> object:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return None


def _head_split(graph: _Graph, name: str) -> str | None:
    """The [batch, seq, heads * dim] tensor that `name` is a Reshape + BNSH Transpose of."""
    node = graph.producer.get(name)
    if node is None or node.op_type != "Transpose" or list(_attribute(node, "perm") or []) != _TO_BNSH:
        return None
    reshape = graph.producer.get(node.input[0])
    return reshape.input[0] if reshape is not None and reshape.op_type == "Reshape" else None


def _single(found: set[str], what: str) -> str:
    if len(found) != 1:
        raise FusionUnsupported(f"expected one {what}, found {len(found)}")
    return next(iter(found))


def _split_inputs(graph: _Graph, name: str, stop: set[str]) -> set[str]:
    """Projection outputs, split into heads, that `name` is computed from; the walk ends at
    each split (the layers before are beyond it) and at the values in `stop`."""
    found: set[str] = set()
    seen: set[str] = set()
    queue = deque([name])
    while queue:
        value = queue.popleft()
        if value in seen or value in stop:
            continue
        seen.add(value)
        split = _head_split(graph, value)
        if split is not None:
            found.add(split)
        elif (node := graph.producer.get(value)) is not None:
            queue.extend(i for i in node.input if i)
    return found


def _find_layer(graph: _Graph, index: int) -> _Layer:
    past_key, past_value = f"past_key_values.{index}.key", f"past_key_values.{index}.value"
    key_concat = graph.made_by(f"present.{index}.key", "Concat")
    value_concat = graph.made_by(f"present.{index}.value", "Concat")
    if list(key_concat.input)[:1] != [past_key] or list(value_concat.input)[:1] != [past_value]:
        raise FusionUnsupported(f"layer {index}: present is not Concat(past, new)")
    value = _head_split(graph, value_concat.input[1])
    if value is None:
        raise FusionUnsupported(f"layer {index}: new values are not a projection split into heads")
    inputs = {past_key, past_value}
    key = _single(_split_inputs(graph, key_concat.input[1], inputs), f"layer {index} key projection")
    # The attention result: the MatMul that reads the values (through the KV-head repeat),
    # then Transpose back and Reshape to [batch, seq, hidden].
    weighted = _values_matmul(graph, value_concat.output[0], index)
    back = graph.readers.get(weighted.output[0], [])
    if len(back) != 1 or back[0].op_type != "Transpose" or list(_attribute(back[0], "perm") or []) != _TO_BNSH:
        raise FusionUnsupported(f"layer {index}: attention result is not transposed back")
    merge = graph.readers.get(back[0].output[0], [])
    if len(merge) != 1 or merge[0].op_type != "Reshape":
        raise FusionUnsupported(f"layer {index}: attention result is not merged back into one hidden axis")
    presents = {key_concat.output[0], value_concat.output[0]}
    query = _single(_split_inputs(graph, weighted.input[0], presents | inputs) - {key}, f"layer {index} query")
    cos, sin = _rotary_tables(graph, key_concat.input[1], inputs, index)
    return _Layer(index, query, key, value, merge[0].output[0], cos, sin)


def _values_matmul(graph: _Graph, present_value: str, index: int) -> object:
    """The MatMul whose second input is `present_value`, through shape-only ops."""
    queue = deque([present_value])
    while queue:
        name = queue.popleft()
        for node in graph.readers.get(name, []):
            if node.op_type == "MatMul" and node.input[1] == name:
                return node
            if node.op_type in ("Unsqueeze", "Expand", "Reshape", "Identity"):
                queue.append(node.output[0])
    raise FusionUnsupported(f"layer {index}: no MatMul reads the values")


def _rotary_tables(graph: _Graph, rotated_key: str, stop: set[str], index: int) -> tuple[str, str]:
    """The Cos and Sin values the key's rotary embedding multiplies by (shared by all layers)."""
    nodes = graph.upstream([rotated_key], stop)
    cos = {n.output[0] for n in nodes if n.op_type == "Cos"}
    sin = {n.output[0] for n in nodes if n.op_type == "Sin"}
    return _single(cos, f"layer {index} rotary cos"), _single(sin, f"layer {index} rotary sin")


def _layer_count(graph: object) -> int:
    names = {value.name for value in graph.input}
    count = 0
    while f"past_key_values.{count}.key" in names:
        count += 1
    if count == 0:
        raise FusionUnsupported("no past_key_values.0.key input")
    return count


def _input_dims(graph: object, name: str) -> list[int | str]:
    for value in graph.input:
        if value.name == name:
            return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
    raise FusionUnsupported(f"no input {name}")


def _rotary_cache(model: object, cos: str, sin: str, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """[max_positions, head_dim / 2] cos and sin tables, computed by the graph's own nodes for
    positions 0..max_positions-1, so they hold exactly the numbers the original graph uses."""
    import onnxruntime as ort
    from onnx import helper

    graph = _Graph(model.graph)
    nodes = graph.upstream([cos, sin])
    needed = {name for node in nodes for name in node.input}
    inputs = [value for value in model.graph.input if value.name in needed]
    if [value.name for value in inputs] != ["position_ids"]:
        raise FusionUnsupported("the rotary tables depend on more than position_ids")
    order = {id(node): i for i, node in enumerate(model.graph.node)}
    sub = helper.make_graph(
        sorted(nodes, key=lambda n: order[id(n)]),
        "rotary_tables",
        inputs,
        [helper.make_empty_tensor_value_info(cos), helper.make_empty_tensor_value_info(sin)],
        [graph.initializers[name] for name in needed if name in graph.initializers],
    )
    sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(sub_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    positions = np.arange(max_positions, dtype=np.int64).reshape(1, -1)
    cos_table, sin_table = session.run(None, {"position_ids": positions})
    half = cos_table.shape[-1] // 2
    cos_table, sin_table = cos_table.reshape(max_positions, -1), sin_table.reshape(max_positions, -1)
    # rotate_half's tables repeat one half; GroupQueryAttention takes that half once.
    if not (
        np.array_equal(cos_table[:, :half], cos_table[:, half:])
        and np.array_equal(sin_table[:, :half], sin_table[:, half:])
    ):
        raise FusionUnsupported("the rotary tables are not two equal halves")
    return cos_table[:, :half], sin_table[:, :half]


def fuse_attention(model: object, max_positions: int) -> int:
    """Rewrite `model` (an onnx ModelProto, in place) to use GroupQueryAttention in every
    layer; return the number of layers fused. Raises FusionUnsupported, leaving `model`
    unchanged, when any layer's attention is not recognised."""
    from onnx import TensorProto, helper, numpy_helper

    graph = _Graph(model.graph)
    layers = [_find_layer(graph, i) for i in range(_layer_count(model.graph))]
    if len({(layer.cos, layer.sin) for layer in layers}) != 1:
        raise FusionUnsupported("layers use different rotary tables")
    kv_dims = _input_dims(model.graph, "past_key_values.0.key")
    kv_heads, head_dim = kv_dims[1], kv_dims[3]
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise FusionUnsupported("the KV cache has no fixed head count or size")
    cos_table, sin_table = _rotary_cache(model, layers[0].cos, layers[0].sin, max_positions)
    if cos_table.shape[1] * 2 != head_dim:
        raise FusionUnsupported("rotary covers part of each head only")
    kv_type = model.graph.input[[v.name for v in model.graph.input].index("past_key_values.0.key")]
    kv_dtype = helper.tensor_dtype_to_np_dtype(kv_type.type.tensor_type.elem_type)
    num_heads = _query_heads(model, graph, layers[0], head_dim)

    prefix = "lumen_gqa_"
    tables = {
        f"{prefix}cos_cache": cos_table.astype(kv_dtype),
        f"{prefix}sin_cache": sin_table.astype(kv_dtype),
        f"{prefix}one": np.array(1, dtype=np.int64),
        f"{prefix}axis_1": np.array([1], dtype=np.int64),
    }
    new_nodes = [
        # seqlens_k: each sequence's last position (mask sum - 1); total_sequence_length: the
        # mask's length. Both int32, as GroupQueryAttention requires.
        helper.make_node("ReduceSum", ["attention_mask", f"{prefix}axis_1"], [f"{prefix}mask_sum"], keepdims=0),
        helper.make_node("Sub", [f"{prefix}mask_sum", f"{prefix}one"], [f"{prefix}last_position"]),
        helper.make_node("Cast", [f"{prefix}last_position"], [f"{prefix}seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], [f"{prefix}mask_shape"]),
        helper.make_node("Gather", [f"{prefix}mask_shape", f"{prefix}one"], [f"{prefix}total_length_64"], axis=0),
        helper.make_node("Cast", [f"{prefix}total_length_64"], [f"{prefix}total_length"], to=TensorProto.INT32),
    ]
    for layer in layers:
        new_nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    layer.query,
                    layer.key,
                    layer.value,
                    f"past_key_values.{layer.index}.key",
                    f"past_key_values.{layer.index}.value",
                    f"{prefix}seqlens_k",
                    f"{prefix}total_length",
                    f"{prefix}cos_cache",
                    f"{prefix}sin_cache",
                ],
                [layer.output, f"present.{layer.index}.key", f"present.{layer.index}.value"],
                name=f"{prefix}layer_{layer.index}",
                domain=MS_DOMAIN,
                num_heads=num_heads,
                kv_num_heads=kv_heads,
                do_rotary=1,
            )
        )
    replaced = {layer.output for layer in layers} | {
        f"present.{layer.index}.{kind}" for layer in layers for kind in ("key", "value")
    }
    kept = [node for node in model.graph.node if not set(node.output) & replaced]
    nodes = _topological(kept + new_nodes, model.graph)
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in tables.items())
    _replace_nodes(model, nodes)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(layers)


def _query_heads(model: object, graph: _Graph, layer: _Layer, head_dim: int) -> int:
    """Query heads: the query projection's width over the head size."""
    width = _width(graph, layer.query)
    if width is None or width % head_dim:
        raise FusionUnsupported("cannot tell the query projection's width")
    return width // head_dim


def _width(graph: _Graph, name: str) -> int | None:
    """The last dimension of a projection's output, read from its bias or its weight (a
    MatMul's, a 4-bit MatMulNBits' N, or an 8-bit MatMulInteger's), looking through Mul/Add."""
    queue, seen = deque([name]), set()
    while queue:
        node = graph.producer.get(queue.popleft())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMulNBits":
            return int(_attribute(node, "N"))
        if node.op_type in ("MatMul", "MatMulInteger") and node.input[1] in graph.initializers:
            return int(graph.initializers[node.input[1]].dims[-1])
        if node.op_type in ("Add", "Mul"):
            for operand in node.input:
                init = graph.initializers.get(operand)
                if init is not None and len(init.dims) == 1 and init.dims[0] > 1:
                    return int(init.dims[0])  # a per-channel bias or scale
            queue.extend(node.input)
    return None


def _topological(nodes: list, graph: object) -> list:
    """The nodes the graph's outputs need, each after the producers of its inputs."""
    producer = {out: node for node in nodes for out in node.output}
    needed: set[int] = set()
    stack = [producer[o.name] for o in graph.output if o.name in producer]
    while stack:
        node = stack.pop()
        if id(node) not in needed:
            needed.add(id(node))
            stack.extend(producer[i] for i in node.input if i in producer)
    kept = [node for node in nodes if id(node) in needed]
    waiting = {id(node): len({i for i in node.input if i in producer}) for node in kept}
    readers: dict[str, list] = {}
    for node in kept:
        for name in {i for i in node.input if i in producer}:
            readers.setdefault(name, []).append(node)
    ready = deque(node for node in kept if waiting[id(node)] == 0)
    order: list = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for out in node.output:
            for reader in readers.get(out, []):
                waiting[id(reader)] -= 1
                if waiting[id(reader)] == 0:
                    ready.append(reader)
    if len(order) != len(kept):
        raise FusionUnsupported("the rewritten graph has a cycle")
    return order


def _replace_nodes(model: object, nodes: list) -> None:
    used = {name for node in nodes for name in node.input}
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    unused = [init for init in model.graph.initializer if init.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
