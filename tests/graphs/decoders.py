"""Decoder graphs as the fusion tests load and run them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lumen_vlm.resources.model_files import locate_model_files


def decoder_path(model_dir: Path, precision: str = "fp32") -> Path:
    return locate_model_files(model_dir, precision).graphs["decoder"]


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


class Decoder:
    """Feeds a decoder session the way the engine does: one sequence, an all-ones mask."""

    def __init__(self, sess: ort.InferenceSession) -> None:
        self.sess = sess
        inputs = {i.name: i for i in sess.get_inputs()}
        self.hidden = inputs["inputs_embeds"].shape[2]
        self.kv_shape = inputs["past_key_values.0.key"].shape
        self.layers = sum(name.startswith("past_key_values.") and name.endswith(".key") for name in inputs)
        self.dtype = np.float16 if inputs["inputs_embeds"].type == "tensor(float16)" else np.float32

    def empty_past(self) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_shape[1], 0, self.kv_shape[3]), self.dtype)] * (2 * self.layers)

    def outputs(self, embeds: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        """Every output (logits, then the KV cache) after `embeds`, continuing from `past`."""
        start = past[0].shape[2]
        total = start + embeds.shape[1]
        feed = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(start, total, dtype=np.int64).reshape(1, -1),
        }
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        return self.sess.run(None, feed)

    def run(self, embeds: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The last position's logits and the KV cache after `embeds`."""
        logits, *presents = self.outputs(embeds, past)
        return logits[:, -1], presents
