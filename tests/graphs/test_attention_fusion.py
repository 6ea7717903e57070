"""The GroupQueryAttention rewrite: same numbers as the graph it replaces, or a refusal."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from lumen_vlm.graphs.attention_fusion import FusionUnsupported, fuse_attention

from .decoders import Decoder, decoder_path, session


def run_both(original: Decoder, fused: Decoder) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(stage, original's values, fused's values) for a 7-token prompt, 3 more prompt tokens
    after it, then one decode step; each stage continues from the original's cache."""
    rng = np.random.default_rng(0)
    compared = []
    past = original.empty_past()
    for stage, tokens in (("prompt", 7), ("continued prompt", 3), ("decode step", 1)):
        embeds = rng.standard_normal((1, tokens, original.hidden)).astype(original.dtype)
        logits, presents = original.run(embeds, past)
        fused_logits, fused_presents = fused.run(embeds, past)
        compared.append((f"{stage} logits", logits, fused_logits))
        compared += [(f"{stage} cache", a, b) for a, b in zip(presents, fused_presents, strict=True)]
        past = presents
    return compared


def fused_copy(path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, int]:
    original = onnx.load(str(path))
    fused = onnx.load(str(path))
    return original, fused, fuse_attention(fused, context_length=256)


def test_every_layer_becomes_one_group_query_attention(tiny_model_dir: Path) -> None:
    original, fused, layers = fused_copy(decoder_path(tiny_model_dir))
    assert layers == Decoder(session(original)).layers
    before = Counter(node.op_type for node in original.graph.node)
    after = Counter(node.op_type for node in fused.graph.node)
    assert after["GroupQueryAttention"] == layers
    assert before["Softmax"] == layers and after["Softmax"] == 0, "the spelled-out attention is gone"
    assert after["Cos"] == after["Sin"] == 0, "the rotary tables are precomputed"
    assert sum(after.values()) < sum(before.values()) / 2
    onnx.checker.check_model(fused)


def test_the_fused_graph_computes_the_same_numbers(tiny_model_dir: Path) -> None:
    original, fused, _ = fused_copy(decoder_path(tiny_model_dir))
    for stage, expected, actual in run_both(Decoder(session(original)), Decoder(session(fused))):
        assert expected.shape == actual.shape, stage
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0, err_msg=stage)


@pytest.mark.parametrize("precision", ["int8", "q4"])
def test_quantized_graphs_are_fused_too(quantized_model_dir: Path, precision: str) -> None:
    original, fused, layers = fused_copy(decoder_path(quantized_model_dir, precision))
    assert layers > 0
    for stage, expected, actual in run_both(Decoder(session(original)), Decoder(session(fused))):
        np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max(), rtol=0, err_msg=stage)


def test_half_precision_graphs_are_fused_too(tiny_model_dir: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    original = convert_float_to_float16(onnx.load(str(decoder_path(tiny_model_dir))), keep_io_types=False)
    fused = onnx.ModelProto()
    fused.CopyFrom(original)
    assert fuse_attention(fused, context_length=256) > 0
    for stage, expected, actual in run_both(Decoder(session(original)), Decoder(session(fused))):
        assert actual.dtype == np.float16, stage
        np.testing.assert_allclose(actual, expected, atol=1e-2 * np.abs(expected).max(), rtol=0, err_msg=stage)


def present_concat_hidden(model: onnx.ModelProto) -> None:
    """present.0.key is no longer a plain Concat of the past and the new keys."""
    concat = next(node for node in model.graph.node if "present.0.key" in node.output)
    concat.output[0] = "present_0_key_raw"
    model.graph.node.append(onnx.helper.make_node("Identity", ["present_0_key_raw"], ["present.0.key"]))


def layer_0_scale_changed(model: onnx.ModelProto) -> None:
    """Layer 0's queries scaled by 0.8 instead of the head size's: a pattern-preserving change."""
    producer = {out: node for node in model.graph.node for out in node.output}
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    scores = next(producer[i] for i in producer[softmax.input[0]].input if producer[i].op_type == "MatMul")
    scaled_query = producer[scores.input[0]]
    assert scaled_query.op_type == "Mul"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.8, np.float32), "test_scale"))
    scaled_query.input[1] = "test_scale"


def rotary_tables_scaled(model: onnx.ModelProto) -> None:
    """cos multiplied by 1.14 after the Cos node, as transformers' yarn and longrope do."""
    cos = next(node for node in model.graph.node if node.op_type == "Cos")
    for node in model.graph.node:
        node.input[:] = ["scaled_cos" if name == cos.output[0] else name for name in node.input]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.14, np.float32), "test_attention_scaling"))
    model.graph.node.append(onnx.helper.make_node("Mul", [cos.output[0], "test_attention_scaling"], ["scaled_cos"]))


@pytest.mark.parametrize(
    "change, reason",
    [
        (present_concat_hidden, r"present\.0\.key is not made by a Concat"),
        (layer_0_scale_changed, r"layer 0, a 7-token step: fused attention's .* differs"),
        (rotary_tables_scaled, r"layer 0, a 7-token step: fused attention's .* differs"),
    ],
)
def test_an_attention_it_does_not_reproduce_is_refused_and_left_unchanged(
    tiny_model_dir: Path, change: Any, reason: str
) -> None:
    model = onnx.load(str(decoder_path(tiny_model_dir)))
    change(model)
    before = model.SerializeToString()
    with pytest.raises(FusionUnsupported, match=reason):
        fuse_attention(model, context_length=256)
    assert model.SerializeToString() == before
