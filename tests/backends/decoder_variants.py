"""Variants of the tiny decoder with the extra or retyped inputs other exports have.

Each computes what the original computes, given the values a plain decode feeds:
- `keep_logits`: a ``num_logits_to_keep`` int64 scalar that slices the logits (or, as
  transformers' ``logits_to_keep`` exports it, the hidden states before the output projection);
- `int32_indices`: ``attention_mask`` / ``position_ids`` (and the embedding's ``input_ids``)
  declared int32, cast to int64 inside;
- `cache_branch`: optimum's merged decoder, an If on a ``use_cache_branch`` bool [1] between
  the decoder with its past (true) and the decoder ignoring the past (false, the first pass);
- `extra_input`: an input no export of this model has.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    return next(node for node in graph.node if name in node.output)


def _rename_reads(nodes: Iterable[onnx.NodeProto], renames: dict[str, str]) -> None:
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _free_sequence_axis(value: onnx.ValueInfoProto, axis: int, name: str) -> None:
    value.type.tensor_type.shape.dim[axis].Clear()
    value.type.tensor_type.shape.dim[axis].dim_param = name


def keep_logits(model: onnx.ModelProto, where: str = "logits") -> onnx.ModelProto:
    """Add ``num_logits_to_keep``: only the last k positions' logits come out."""
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, []))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([INT64_MAX], dtype=np.int64), "keep_end"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "keep_axis"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "keep_unsqueeze_axes"),
        ]
    )
    projection = _producer(graph, "logits")
    if where == "logits":  # slice the computed logits
        projection.output[0] = "logits_every_position"
        sliced_from, sliced_to = "logits_every_position", "logits"
    else:  # slice the hidden states, then project (transformers' logits_to_keep)
        sliced_from, sliced_to = projection.input[0], "hidden_kept"
        projection.input[0] = "hidden_kept"
    start_nodes = [
        helper.make_node("Neg", ["num_logits_to_keep"], ["keep_start_scalar"]),
        helper.make_node("Unsqueeze", ["keep_start_scalar", "keep_unsqueeze_axes"], ["keep_start"]),
        helper.make_node("Slice", [sliced_from, "keep_start", "keep_end", "keep_axis"], [sliced_to]),
    ]
    at = list(graph.node).index(projection) + (1 if where == "logits" else 0)
    for offset, node in enumerate(start_nodes):
        graph.node.insert(at + offset, node)
    _free_sequence_axis(next(o for o in graph.output if o.name == "logits"), 1, "kept_positions")
    onnx.checker.check_model(model)
    return model


def int32_indices(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Declare the int64 inputs `names` int32, each cast back to int64 for the nodes."""
    graph = model.graph
    renames = {name: f"{name}_as_int64" for name in names}
    _rename_reads(graph.node, renames)
    for name, cast in renames.items():
        declared = next(value for value in graph.input if value.name == name)
        assert declared.type.tensor_type.elem_type == TensorProto.INT64
        declared.type.tensor_type.elem_type = TensorProto.INT32
        graph.node.insert(0, helper.make_node("Cast", [name], [cast], to=TensorProto.INT64))
    onnx.checker.check_model(model)
    return model


def _branch(graph: onnx.GraphProto, prefix: str, outer: set[str], past_ignored: bool) -> onnx.GraphProto:
    """The decoder's nodes as an If branch: values it makes get `prefix`; with `past_ignored`,
    every past_key_values input is read as an empty cache instead."""
    made = {out for node in graph.node for out in node.output if out}
    renames = {name: prefix + name for name in made}
    nodes = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        copy.output[:] = [renames.get(out, out) for out in node.output]
        nodes.append(copy)
    _rename_reads(nodes, renames)
    if past_ignored:
        pasts = {name: f"{prefix}{name}_empty" for name in outer if name.startswith("past_key_values.")}
        _rename_reads(nodes, pasts)
        empties = [
            helper.make_node("Slice", [name, "branch_zero", "branch_zero", "branch_axis"], [empty])
            for name, empty in sorted(pasts.items())
        ]
        nodes = empties + nodes
    outputs = []
    for output in graph.output:
        value = onnx.ValueInfoProto()
        value.CopyFrom(output)
        value.name = renames[output.name]
        value.type.tensor_type.ClearField("shape")
        outputs.append(value)
    return helper.make_graph(nodes, prefix + "decoder", [], outputs)


def cache_branch(model: onnx.ModelProto) -> onnx.ModelProto:
    """optimum's merged decoder: If(use_cache_branch, with the past, without it)."""
    graph = model.graph
    outer = {value.name for value in graph.input}
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "branch_zero"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "branch_axis"),
        ]
    )
    with_past = _branch(graph, "with_past_", outer, past_ignored=False)
    without_past = _branch(graph, "no_past_", outer, past_ignored=True)
    choose = helper.make_node(
        "If",
        ["use_cache_branch"],
        [output.name for output in graph.output],
        name="optimum_if",
        then_branch=with_past,
        else_branch=without_past,
    )
    del graph.node[:]
    graph.node.append(choose)
    graph.input.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    onnx.checker.check_model(model)
    return model


def extra_input(model: onnx.ModelProto, name: str, elem_type: int = TensorProto.INT64) -> onnx.ModelProto:
    """Declare one more input, read by a node whose result is added to the logits times zero."""
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info(name, elem_type, []))
    projection = _producer(graph, "logits")
    projection.output[0] = "logits_before_extra"
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "extra_zero"))
    graph.node.extend(
        [
            helper.make_node("Cast", [name], ["extra_as_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["extra_as_float", "extra_zero"], ["extra_nothing"]),
            helper.make_node("Add", ["logits_before_extra", "extra_nothing"], ["logits"]),
        ]
    )
    onnx.checker.check_model(model)
    return model
