"""The RMS norm rewrite: same numbers as the nodes it replaces, or those nodes kept."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lumen_vlm.graphs import norm_fusion
from lumen_vlm.graphs.norm_fusion import fuse_residual_adds, fuse_rms_norms

from .decoders import Decoder, decoder_path, session


def decoder(model_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(decoder_path(model_dir)))


def prefill_outputs(model: onnx.ModelProto) -> list[np.ndarray]:
    """Logits and KV cache for a 6-token prompt of random embeddings."""
    runner = Decoder(session(model))
    embeds = np.random.default_rng(0).standard_normal((1, 6, runner.hidden)).astype(runner.dtype)
    return runner.outputs(embeds, runner.empty_past())


def test_every_rms_norm_becomes_one_node_with_the_same_numbers(tiny_model_dir: Path) -> None:
    original, fused = decoder(tiny_model_dir), decoder(tiny_model_dir)
    layers = sum(value.name.endswith(".key") for value in original.graph.input)
    assert fuse_rms_norms(fused) == 2 * layers + 1  # two a layer and the final norm
    ops = Counter(node.op_type for node in fused.graph.node)
    assert ops["SimplifiedLayerNormalization"] == 2 * layers + 1
    assert ops["ReduceMean"] == ops["Reciprocal"] == ops["Pow"] == 0
    for want, got in zip(prefill_outputs(original), prefill_outputs(fused), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)


def test_a_norm_it_does_not_reproduce_is_kept(tiny_model_dir: Path) -> None:
    model = decoder(tiny_model_dir)
    # The first norm averages over the sequence axis: the pattern holds, the numbers do not.
    mean = next(node for node in model.graph.node if node.op_type == "ReduceMean")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "test_sequence_axis"))
    mean.input[1] = "test_sequence_axis"
    expected = prefill_outputs(model)
    layers = sum(value.name.endswith(".key") for value in model.graph.input)
    assert fuse_rms_norms(model) == 2 * layers
    assert any(mean.output[0] in node.output for node in model.graph.node), "the odd norm's nodes are kept"
    for want, got in zip(expected, prefill_outputs(model), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)


def test_a_norm_whose_inner_value_is_a_graph_output_is_kept(tiny_model_dir: Path) -> None:
    model = decoder(tiny_model_dir)
    mean = next(node for node in model.graph.node if node.op_type == "ReduceMean")
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(mean.output[0]))
    layers = sum(value.name.endswith(".key") for value in model.graph.input)
    assert fuse_rms_norms(model) == 2 * layers
    prefill_outputs(model)  # still a graph ORT runs: the output's producer is there


def test_the_check_sees_a_wrong_epsilon(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_node = norm_fusion._fused_node

    def tenfold_epsilon(norm: Any, index: int) -> onnx.NodeProto:
        return make_node(dataclasses.replace(norm, epsilon=norm.epsilon * 10), index)

    monkeypatch.setattr(norm_fusion, "_fused_node", tenfold_epsilon)
    assert fuse_rms_norms(decoder(tiny_model_dir)) == 0


def test_values_read_inside_a_subgraph_are_kept() -> None:
    """An If branch reading an outer node's output and an outer initializer: neither may go
    when the norm before it is rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    width = 16
    consts = {
        "two": np.array(2.0, np.float32),
        "axes": np.array([-1], np.int64),
        "eps": np.array(1e-6, np.float32),
        "weight": np.linspace(0.5, 1.5, width, dtype=np.float32),
        "outer_bias": np.full(width, 3.0, np.float32),
        "flag": np.array(True),
    }
    norm = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("Mul", ["weight", "normed"], ["y"]),
    ]
    branch = helper.make_graph(
        [helper.make_node("Add", ["negated", "outer_bias"], ["branch_out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        *norm,
        helper.make_node("Neg", ["y"], ["negated"]),
        helper.make_node("If", ["flag"], ["out"], then_branch=branch, else_branch=branch),
    ]
    graph = helper.make_graph(
        nodes,
        "norm_then_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, width])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in consts.items()],
    )
    opsets = [helper.make_opsetid("", 18)]
    # The lowest IR version for the opset, not onnx's newest: older ONNX Runtimes refuse newer ones.
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    x = np.random.default_rng(1).standard_normal((1, 3, width)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    expected = run(model)
    assert fuse_rms_norms(model) == 1
    np.testing.assert_allclose(run(model), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- residual adds


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def test_each_residual_add_goes_into_the_norm_that_reads_it_with_the_same_numbers(tiny_model_dir: Path) -> None:
    original, fused = decoder(tiny_model_dir), decoder(tiny_model_dir)
    layers = sum(value.name.endswith(".key") for value in original.graph.input)
    fuse_rms_norms(fused)
    adds_before = ops(fused)["Add"]
    # Two a layer: after attention, and the layer's output (the next layer's input norm, or
    # the final norm); the first layer's input norm reads the embeddings, no Add.
    assert fuse_residual_adds(fused) == 2 * layers
    assert ops(fused)["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops(fused)["SimplifiedLayerNormalization"] == 1
    assert ops(fused)["Add"] == adds_before - 2 * layers
    for want, got in zip(prefill_outputs(original), prefill_outputs(fused), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)


def test_a_residual_add_whose_sum_is_a_graph_output_is_kept(tiny_model_dir: Path) -> None:
    model = decoder(tiny_model_dir)
    layers = sum(value.name.endswith(".key") for value in model.graph.input)
    fuse_rms_norms(model)
    graph = norm_fusion.GraphIndex(model.graph)
    norm = next(
        node
        for node in graph.nodes
        if node.op_type == "SimplifiedLayerNormalization"
        and node.input[0] in graph.producer
        and graph.producer[node.input[0]].op_type == "Add"
    )
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(norm.input[0]))
    assert fuse_residual_adds(model) == 2 * layers - 1
    prefill_outputs(model)  # still a graph ORT runs


def test_the_residual_check_sees_a_wrong_epsilon(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_node = norm_fusion._skip_norm_node

    def huge_epsilon(add: onnx.NodeProto, norm: onnx.NodeProto, index: int) -> onnx.NodeProto:
        node = make_node(add, norm, index)
        for attr in node.attribute:
            if attr.name == "epsilon":
                attr.f *= 1e6  # large enough to move every row's result
        return node

    monkeypatch.setattr(norm_fusion, "_skip_norm_node", huge_epsilon)
    model = decoder(tiny_model_dir)
    fuse_rms_norms(model)
    assert fuse_residual_adds(model) == 0
