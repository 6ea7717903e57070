"""Rewrites a decoder graph's attention into ONNX Runtime's fused GroupQueryAttention.

The public exports spell attention out op by op: per layer, a rotary embedding, the
concatenation of past and new keys, the repetition of KV heads, two MatMuls, a mask and a
softmax, about forty small nodes. On a 2-core CPU decoding one token at a time, those nodes
and the executor's work between them cost about as much as the weights' MatMuls (measured on
FastVLM-0.5B q4: an 18 ms step, of which MatMulNBits took 10 ms).
``com.microsoft.GroupQueryAttention`` does all of it in one kernel, rotary included.

The rewrite is found from the graph's interface, not from the exporter's node names: for
layer i, ``present.i.key`` / ``present.i.value`` are a Concat of the past and the new keys /
values, the new ones are a Reshape + Transpose of a projection's output, and the attention
result is the Reshape that follows the MatMul reading the values. Everything between goes.
The rotary tables are produced by running the graph's own cos/sin nodes, so their numbers
are exactly the original's. A pattern cannot see everything (a scale, rotary tables scaled
after Cos, a head size or an ORT version the kernel mishandles), so each layer is also run
both ways on random inputs before anything changes. `fuse_attention` refuses
(FusionUnsupported) any graph it does not recognise or reproduce; the caller then keeps the
graph as it is.

The fused graph assumes what this engine always feeds: one sequence, an all-ones attention
mask, and positions counting from 0 (GroupQueryAttention derives positions from the mask).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..backends.ort_runtime import ort
from ..resources.export_names import EXPORT_NAMES as NAMES
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
    single,
    small_session,
)

if TYPE_CHECKING:  # onnx itself is imported only when a graph is rewritten (see decoder.py)
    import onnx

_TO_BNSH = [0, 2, 1, 3]


@dataclass(frozen=True)
class _Layer:
    index: int
    query: str  # projection outputs, [batch, seq, heads * head_dim]
    key: str
    value: str
    output: str  # attention result, [batch, seq, heads * head_dim], read by the output projection
    cos: str  # the graph's rotary tables, [batch, seq, head_dim]
    sin: str

    @property
    def past(self) -> list[str]:
        """The layer's KV cache inputs, keys then values."""
        return list(NAMES.past(self.index))

    @property
    def presents(self) -> list[str]:
        """The layer's KV cache outputs, keys then values."""
        return list(NAMES.present(self.index))


def _swaps_heads_and_sequence(node: onnx.NodeProto | None) -> bool:
    """Whether `node` is the Transpose between [batch, seq, heads, dim] and [batch, heads, seq, dim]."""
    return node is not None and node.op_type == "Transpose" and list(attribute(node, "perm") or []) == _TO_BNSH


def _head_split(graph: GraphIndex, name: str) -> str | None:
    """The [batch, seq, heads * dim] tensor that `name` is a Reshape + BNSH Transpose of."""
    node = graph.producer.get(name)
    if node is None or not _swaps_heads_and_sequence(node):
        return None
    reshape = graph.producer.get(node.input[0])
    return reshape.input[0] if reshape is not None and reshape.op_type == "Reshape" else None


def _split_inputs(graph: GraphIndex, name: str, stop: set[str]) -> set[str]:
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


def _find_layer(graph: GraphIndex, index: int) -> _Layer:
    past_key, past_value = NAMES.past(index)
    present_key, present_value = NAMES.present(index)
    key_concat = graph.made_by(present_key, "Concat")
    value_concat = graph.made_by(present_value, "Concat")
    if list(key_concat.input)[:1] != [past_key] or list(value_concat.input)[:1] != [past_value]:
        raise FusionUnsupported(f"layer {index}: present is not Concat(past, new)")
    value = _head_split(graph, value_concat.input[1])
    if value is None:
        raise FusionUnsupported(f"layer {index}: new values are not a projection split into heads")
    inputs = {past_key, past_value}
    key = single(_split_inputs(graph, key_concat.input[1], inputs), f"layer {index} key projection")
    # The attention result: the MatMul that reads the values (through the KV-head repeat),
    # then Transpose back and Reshape to [batch, seq, hidden].
    weighted = _values_matmul(graph, value_concat.output[0], index)
    back = graph.readers.get(weighted.output[0], [])
    if len(back) != 1 or not _swaps_heads_and_sequence(back[0]):
        raise FusionUnsupported(f"layer {index}: attention result is not transposed back")
    merge = graph.readers.get(back[0].output[0], [])
    if len(merge) != 1 or merge[0].op_type != "Reshape":
        raise FusionUnsupported(f"layer {index}: attention result is not merged back into one hidden axis")
    presents = {key_concat.output[0], value_concat.output[0]}
    query = single(_split_inputs(graph, weighted.input[0], presents | inputs) - {key}, f"layer {index} query")
    cos, sin = _rotary_tables(graph, key_concat.input[1], inputs, index)
    return _Layer(index, query, key, value, merge[0].output[0], cos, sin)


def _values_matmul(graph: GraphIndex, present_value: str, index: int) -> onnx.NodeProto:
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


def _rotary_tables(graph: GraphIndex, rotated_key: str, stop: set[str], index: int) -> tuple[str, str]:
    """The outputs of the Cos and Sin nodes the key's rotary embedding is computed from
    (shared by all layers); whatever the graph does with them after is checked by running."""
    nodes = graph.upstream([rotated_key], stop)
    cos = {n.output[0] for n in nodes if n.op_type == "Cos"}
    sin = {n.output[0] for n in nodes if n.op_type == "Sin"}
    return single(cos, f"layer {index} rotary cos"), single(sin, f"layer {index} rotary sin")


def _input_type(model: onnx.ModelProto, name: str) -> int:
    """The onnx element type graph input `name` is declared with (int64 or int32 for the
    mask and positions, which some exports declare as int32 and cast inside)."""
    declared = next((value for value in model.graph.input if value.name == name), None)
    if declared is None:
        raise FusionUnsupported(f"no {name} input")
    return declared.type.tensor_type.elem_type


def _numpy_type(model: onnx.ModelProto, name: str) -> type[np.generic]:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(_input_type(model, name)).type


def _layer_count(graph: onnx.GraphProto) -> int:
    names = {value.name for value in graph.input}
    count = 0
    while NAMES.past(count)[0] in names:
        count += 1
    if count == 0:
        raise FusionUnsupported(f"no {NAMES.past(0)[0]} input")
    return count


def _rotary_cache(
    model: onnx.ModelProto, graph: GraphIndex, layer: _Layer, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """[context_length, head_dim / 2] cos and sin tables, computed by the graph's own nodes for
    positions 0..context_length-1, so they hold exactly the numbers the original graph uses."""
    session = cut_session(model, graph, [layer.cos, layer.sin], {})
    if [value.name for value in session.get_inputs()] != [NAMES.position_ids]:
        raise FusionUnsupported(f"the rotary tables depend on more than {NAMES.position_ids}")
    positions = np.arange(context_length, dtype=_numpy_type(model, NAMES.position_ids)).reshape(1, -1)
    cos_table, sin_table = session.run(None, {NAMES.position_ids: positions})
    half = cos_table.shape[-1] // 2
    cos_table, sin_table = cos_table.reshape(context_length, -1), sin_table.reshape(context_length, -1)
    # rotate_half's tables repeat one half; GroupQueryAttention takes that half once.
    if not (
        np.array_equal(cos_table[:, :half], cos_table[:, half:])
        and np.array_equal(sin_table[:, :half], sin_table[:, half:])
    ):
        raise FusionUnsupported("the rotary tables are not two equal halves")
    return cos_table[:, :half], sin_table[:, :half]


@dataclass(frozen=True)
class _Heads:
    query: int
    kv: int
    size: int
    dtype: np.dtype  # of activations and the KV cache
    onnx_type: int
    hidden: int  # the decoder's input width


def _heads(model: onnx.ModelProto, graph: GraphIndex, layer: _Layer) -> _Heads:
    """Head counts and size, from the KV cache input and the query projection's width."""
    from onnx import helper

    kv_input = next(value for value in model.graph.input if value.name == layer.past[0])
    dims = [d.dim_value if d.HasField("dim_value") else None for d in kv_input.type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[1] or not dims[3]:
        raise FusionUnsupported("the KV cache is not [batch, heads, positions, head size] with fixed heads")
    width = _width(graph, layer.query)
    if width is None or width % dims[3]:
        raise FusionUnsupported("cannot tell the query projection's width")
    embeds = next((value for value in model.graph.input if value.name == NAMES.inputs_embeds), None)
    hidden = embeds.type.tensor_type.shape.dim[-1].dim_value if embeds is not None else 0
    onnx_type = kv_input.type.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(onnx_type)
    return _Heads(width // dims[3], dims[1], dims[3], dtype, onnx_type, hidden)


# The probe's steps, as the engine runs them: a prompt, more prompt after it (the prefix
# cache's continuation), then a decode step.
_PROBE_STEPS = (7, 3, 1)


def _check_layer(
    model: onnx.ModelProto,
    graph: GraphIndex,
    layer: _Layer,
    fused_nodes: list[onnx.NodeProto],
    tables: list[onnx.TensorProto],
    heads: _Heads,
) -> None:
    """Run the layer's attention as the graph spells it out and as fused, on the same random
    projections, and raise FusionUnsupported if they differ. This catches what the pattern
    cannot see: another scale, scaled rotary tables, a head size or an onnxruntime version
    the kernel mishandles."""
    from onnx import helper

    outputs = [layer.output, *layer.presents]
    projections = [layer.query, layer.key, layer.value]
    try:
        spelled_out = cut_session(model, graph, outputs, dict.fromkeys(projections, heads.onnx_type))
        inputs = [helper.make_tensor_value_info(name, heads.onnx_type, None) for name in projections + layer.past]
        mask_type = _input_type(model, NAMES.attention_mask)
        inputs.append(helper.make_tensor_value_info(NAMES.attention_mask, mask_type, None))
        fused = small_session(model, fused_nodes, inputs, outputs, tables)
        _compare_steps(model, spelled_out, fused, layer, heads)
    except FusionUnsupported:
        raise
    except Exception as exc:  # ORT refusing to build or run the fused node, e.g. a head size it lacks
        raise FusionUnsupported(f"layer {layer.index}: GroupQueryAttention cannot run it here ({exc})") from exc


def _compare_steps(
    model: onnx.ModelProto,
    spelled_out: ort.InferenceSession,
    fused: ort.InferenceSession,
    layer: _Layer,
    heads: _Heads,
) -> None:
    """Feed both sessions the probe's steps; the fused one writes its cache in place, as the
    engine does, the spelled-out one gets its own presents back as the next past."""
    past, presents = layer.past, layer.presents
    cache = [np.zeros((1, heads.kv, sum(_PROBE_STEPS), heads.size), heads.dtype) for _ in past]
    cache_values = [ort.OrtValue.ortvalue_from_numpy(array) for array in cache]
    state = [np.zeros((1, heads.kv, 0, heads.size), heads.dtype) for _ in past]
    rng = np.random.default_rng(layer.index)
    wanted = {value.name for value in spelled_out.get_inputs()}
    for tokens in _PROBE_STEPS:
        start, total = state[0].shape[2], state[0].shape[2] + tokens
        feed = {
            layer.query: rng.standard_normal((1, tokens, heads.query * heads.size)).astype(heads.dtype),
            layer.key: rng.standard_normal((1, tokens, heads.kv * heads.size)).astype(heads.dtype),
            layer.value: rng.standard_normal((1, tokens, heads.kv * heads.size)).astype(heads.dtype),
            NAMES.attention_mask: np.ones((1, total), _numpy_type(model, NAMES.attention_mask)),
            NAMES.position_ids: np.arange(start, total, dtype=_numpy_type(model, NAMES.position_ids)).reshape(1, -1),
            NAMES.inputs_embeds: np.zeros((1, tokens, heads.hidden), heads.dtype),  # read for its shape only
            **dict(zip(past, state, strict=True)),
        }
        for value in model.graph.input:  # other layers' past, read for its shape only
            feed.setdefault(value.name, state[0])
        expected = spelled_out.run(None, {name: feed[name] for name in wanted})
        binding = fused.io_binding()
        for name in (layer.query, layer.key, layer.value, NAMES.attention_mask):
            binding.bind_cpu_input(name, feed[name])
        binding.bind_output(layer.output, "cpu")
        for past_name, present_name, value in zip(past, presents, cache_values, strict=True):
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)
        fused.run_with_iobinding(binding)
        actual = [binding.get_outputs()[0].numpy(), *(array[:, :, :total] for array in cache)]
        for name, want, got in zip([layer.output, *presents], expected, actual, strict=True):
            _require_close(name, want, got, heads.dtype, f"layer {layer.index}, a {tokens}-token step")
        state = expected[1:]


def _require_close(name: str, want: np.ndarray, got: np.ndarray, dtype: np.dtype, where: str) -> None:
    error = rewrite_error(want, got)
    if not error <= allowed_error(dtype):  # NaN fails too
        raise FusionUnsupported(
            f"{where}: fused attention's {name} differs from the graph's (relative error {error:.3g})"
        )


def fuse_attention(model: onnx.ModelProto, context_length: int) -> int:
    """Rewrite `model` (an onnx ModelProto, in place) to use GroupQueryAttention in every
    layer; return the number of layers fused. Raises FusionUnsupported, leaving `model`
    unchanged, when any layer's attention is not recognised or the fused kernel does not
    compute what the graph did."""
    from onnx import TensorProto, helper, numpy_helper

    graph = GraphIndex(model.graph)
    layers = [_find_layer(graph, i) for i in range(_layer_count(model.graph))]
    if len({(layer.cos, layer.sin) for layer in layers}) != 1:
        raise FusionUnsupported("layers use different rotary tables")
    heads = _heads(model, graph, layers[0])
    cos_table, sin_table = _rotary_cache(model, graph, layers[0], context_length)
    if cos_table.shape[1] * 2 != heads.size:
        raise FusionUnsupported("rotary covers part of each head only")

    prefix = "lumen_gqa_"
    tables = [
        numpy_helper.from_array(value, name)
        for name, value in {
            f"{prefix}cos_cache": cos_table.astype(heads.dtype),
            f"{prefix}sin_cache": sin_table.astype(heads.dtype),
            f"{prefix}one": np.array(1, dtype=np.int64),
            f"{prefix}axis_1": np.array([1], dtype=np.int64),
        }.items()
    ]
    # The mask as int64, for the arithmetic below (some exports declare it int32).
    mask = NAMES.attention_mask
    mask_nodes = []
    if _input_type(model, mask) != TensorProto.INT64:
        mask_nodes.append(helper.make_node("Cast", [mask], [f"{prefix}mask_int64"], to=TensorProto.INT64))
        mask = f"{prefix}mask_int64"
    mask_nodes += [
        # seqlens_k: each sequence's last position (mask sum - 1); total_sequence_length: the
        # mask's length. Both int32, as GroupQueryAttention requires.
        helper.make_node("ReduceSum", [mask, f"{prefix}axis_1"], [f"{prefix}mask_sum"], keepdims=0),
        helper.make_node("Sub", [f"{prefix}mask_sum", f"{prefix}one"], [f"{prefix}last_position"]),
        helper.make_node("Cast", [f"{prefix}last_position"], [f"{prefix}seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", [mask], [f"{prefix}mask_shape"]),
        helper.make_node("Gather", [f"{prefix}mask_shape", f"{prefix}one"], [f"{prefix}total_length_64"], axis=0),
        helper.make_node("Cast", [f"{prefix}total_length_64"], [f"{prefix}total_length"], to=TensorProto.INT32),
    ]
    attention_nodes = [
        helper.make_node(
            "GroupQueryAttention",
            [
                layer.query,
                layer.key,
                layer.value,
                *layer.past,
                f"{prefix}seqlens_k",
                f"{prefix}total_length",
                f"{prefix}cos_cache",
                f"{prefix}sin_cache",
            ],
            [layer.output, *layer.presents],
            name=f"{prefix}layer_{layer.index}",
            domain=MS_DOMAIN,
            num_heads=heads.query,
            kv_num_heads=heads.kv,
            do_rotary=1,
        )
        for layer in layers
    ]
    for layer, node in zip(layers, attention_nodes, strict=True):
        _check_layer(model, graph, layer, [*mask_nodes, node], tables, heads)

    replaced = {name for layer in layers for name in (layer.output, *layer.presents)}
    kept = [node for node in graph.nodes if not set(node.output) & replaced]
    replace_nodes(model, kept + mask_nodes + attention_nodes)
    model.graph.initializer.extend(tables)
    model.opset_import.extend(ms_opset_if_missing(model.opset_import))
    return len(layers)


def _width(graph: GraphIndex, name: str) -> int | None:
    """The last dimension of a projection's output, read from its bias or its weight (a
    MatMul's, a 4-bit MatMulNBits' N, or an 8-bit MatMulInteger's), looking through Mul/Add."""
    queue, seen = deque([name]), set()
    while queue:
        node = graph.producer.get(queue.popleft())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMulNBits":
            return int(attribute(node, "N"))
        if node.op_type in ("MatMul", "MatMulInteger") and node.input[1] in graph.initializers:
            return int(graph.initializers[node.input[1]].dims[-1])
        if node.op_type in ("Add", "Mul"):
            for operand in node.input:
                init = graph.initializers.get(operand)
                if init is not None and len(init.dims) == 1 and init.dims[0] > 1:
                    return int(init.dims[0])  # a per-channel bias or scale
            queue.extend(node.input)
    return None
