"""The packed q/k/v rewrite: the joined projection fed to GroupQueryAttention as one tensor,
with the same numbers, or the layer kept."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import pytest

from lumen_vlm.graphs import packed_attention
from lumen_vlm.graphs.attention_fusion import fuse_attention
from lumen_vlm.graphs.packed_attention import pack_attention_inputs
from lumen_vlm.graphs.projection_fusion import fuse_projections

from .decoders import decoder_path
from .test_projection_fusion import assert_same_numbers, layer_count, prefill_outputs


def fused_decoder(path: Path) -> onnx.ModelProto:
    """The decoder as the runtime's rewrites leave it before packing: GroupQueryAttention, and
    q/k/v as one matmul and a Split."""
    model = onnx.load(str(path))
    fuse_attention(model, context_length=256)
    fuse_projections(model)
    return model


def attention_inputs(model: onnx.ModelProto) -> list[list[str]]:
    return [list(node.input[:3]) for node in model.graph.node if node.op_type == "GroupQueryAttention"]


@pytest.mark.parametrize("form", ["fp32", "q4"])
def test_each_layer_reads_q_k_v_packed_with_the_same_numbers(
    form: str, tiny_model_dir: Path, request: pytest.FixtureRequest
) -> None:
    path = decoder_path(tiny_model_dir) if form == "fp32" else request.getfixturevalue("q4_decoder")
    unpacked, packed = fused_decoder(path), fused_decoder(path)
    layers = layer_count(unpacked)
    before = Counter(node.op_type for node in unpacked.graph.node)
    assert pack_attention_inputs(packed) == layers
    after = Counter(node.op_type for node in packed.graph.node)
    assert after["Split"] == before["Split"] - layers  # gate/up keep theirs
    assert after["Add"] == before["Add"] - 2 * layers  # three bias Adds become one
    assert all(inputs[1:] == ["", ""] for inputs in attention_inputs(packed))
    assert_same_numbers(prefill_outputs(unpacked), prefill_outputs(packed))


def test_a_layer_it_does_not_reproduce_is_kept(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_nodes = packed_attention._packed_nodes

    def k_and_v_biases_swapped(layer: Any, index: int) -> tuple[list[onnx.NodeProto], onnx.TensorProto]:
        q, k, v = layer.biases  # k and v are as wide, so the joined bias still fits
        return make_nodes(type(layer)(layer.attention, layer.split, layer.adds, (q, v, k)), index)

    monkeypatch.setattr(packed_attention, "_packed_nodes", k_and_v_biases_swapped)
    model = fused_decoder(decoder_path(tiny_model_dir))
    expected = prefill_outputs(model)
    assert pack_attention_inputs(model) == 0
    assert all(all(inputs) for inputs in attention_inputs(model))
    assert_same_numbers(expected, prefill_outputs(model))


def test_attention_whose_q_is_read_elsewhere_is_kept(tiny_model_dir: Path) -> None:
    model = fused_decoder(decoder_path(tiny_model_dir))
    first_query = attention_inputs(model)[0][0]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(first_query))
    assert pack_attention_inputs(model) == layer_count(model) - 1
    prefill_outputs(model)  # still a graph ORT runs
