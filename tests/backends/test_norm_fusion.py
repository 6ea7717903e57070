"""The RMS norm rewrite: same numbers as the nodes it replaces, or those nodes kept."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lumen_vlm.backends.norm_fusion import fuse_rms_norms
from lumen_vlm.resources.model_files import locate_model_files


def decoder(model_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(locate_model_files(model_dir).graphs["decoder"]))


def prefill_outputs(model: onnx.ModelProto) -> list[np.ndarray]:
    """Logits and KV cache for a 6-token prompt of random embeddings."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    kv = inputs["past_key_values.0.key"].shape
    feed = {
        "inputs_embeds": np.random.default_rng(0).standard_normal((1, 6, inputs["inputs_embeds"].shape[2])),
        "attention_mask": np.ones((1, 6), np.int64),
        "position_ids": np.arange(6, dtype=np.int64).reshape(1, -1),
    }
    feed["inputs_embeds"] = feed["inputs_embeds"].astype(np.float32)
    for name in inputs:
        if name.startswith("past_key_values."):
            feed[name] = np.zeros((1, kv[1], 0, kv[3]), np.float32)
    return sess.run(None, feed)


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
