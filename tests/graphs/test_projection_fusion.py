"""The sibling-projection rewrite: q/k/v and gate/up as one matmul each, with the same numbers,
or the siblings kept."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from lumen_vlm.graphs import projection_fusion
from lumen_vlm.graphs.projection_fusion import fuse_projections

from .decoders import Decoder, decoder_path, session


def prefill_outputs(model: onnx.ModelProto) -> list[np.ndarray]:
    """Logits and KV cache for a 6-token prompt of random embeddings, then one more token."""
    runner = Decoder(session(model))
    rng = np.random.default_rng(0)
    first = runner.outputs(rng.standard_normal((1, 6, runner.hidden)).astype(runner.dtype), runner.empty_past())
    second = runner.outputs(rng.standard_normal((1, 1, runner.hidden)).astype(runner.dtype), first[1:])
    return first + second


def layer_count(model: onnx.ModelProto) -> int:
    return sum(value.name.endswith(".key") for value in model.graph.input)


def weight_matmuls(model: onnx.ModelProto) -> int:
    weights = {init.name for init in model.graph.initializer}
    return sum(
        node.op_type == "MatMulNBits" or (node.op_type == "MatMul" and node.input[1] in weights)
        for node in model.graph.node
    )


def assert_same_numbers(want: list[np.ndarray], got: list[np.ndarray]) -> None:
    for expected, actual in zip(want, got, strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)


@pytest.mark.parametrize("form", ["fp32", "q4"])
def test_q_k_v_and_gate_up_become_one_matmul_each_with_the_same_numbers(
    form: str, tiny_model_dir: Path, request: pytest.FixtureRequest
) -> None:
    path = decoder_path(tiny_model_dir) if form == "fp32" else request.getfixturevalue("q4_decoder")
    original, fused = onnx.load(str(path)), onnx.load(str(path))
    before = weight_matmuls(original)
    layers = layer_count(original)
    assert fuse_projections(fused) == 3 * layers  # q, k, v -> 1 and gate, up -> 1, each layer
    assert weight_matmuls(fused) == before - 3 * layers
    assert Counter(node.op_type for node in fused.graph.node)["Split"] >= 2 * layers
    assert_same_numbers(prefill_outputs(original), prefill_outputs(fused))


def test_a_group_it_does_not_reproduce_is_kept(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    joined = projection_fusion._joined_initializers

    def siblings_swapped(graph: Any, group: Any, index: int) -> list[onnx.TensorProto]:
        swapped = type(group)(group.source, tuple(reversed(group.nodes)), group.widths)
        return joined(graph, swapped, index)

    monkeypatch.setattr(projection_fusion, "_joined_initializers", siblings_swapped)
    model = onnx.load(str(decoder_path(tiny_model_dir)))
    before = weight_matmuls(model)
    # gate and up have equal widths, so swapped they still fit the Split, but give each
    # other's numbers: the check refuses every group, and the graph keeps all its matmuls.
    assert fuse_projections(model) == 0
    assert weight_matmuls(model) == before


def test_siblings_of_different_quantization_are_kept_apart(q4_decoder: Path) -> None:
    model = onnx.load(str(q4_decoder))
    layers = layer_count(model)
    first_q = next(node for node in model.graph.node if node.op_type == "MatMulNBits")
    for attr in first_q.attribute:
        if attr.name == "accuracy_level":
            attr.i = 0 if attr.i else 4
    expected = prefill_outputs(model)
    # The first layer's q no longer matches k and v: they join, it stays alone.
    assert fuse_projections(model) == 3 * layers - 1
    assert_same_numbers(expected, prefill_outputs(model))
