"""Checks that the ONNX engine reproduces transformers' golden outputs; shared by two test files."""

from __future__ import annotations

from typing import Any

import numpy as np

from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, GenerationParams, GenerationRequest
from lumen_vlm.resources.model_spec import ResizeMode

LOGIT_TOLERANCE = 1e-4


def golden_request(case: dict[str, Any]) -> GenerationRequest:
    return GenerationRequest(
        messages=case["messages"],
        image=case["image_bytes"],
        params=GenerationParams(max_new_tokens=case["max_new_tokens"]),
        resize_mode=ResizeMode(case["resize_mode"]),
    )


def assert_case_matches(manager: FastVLMModelManager, case: dict[str, Any]) -> float:
    """Assert prompt ids, pixels, prefill logits and greedy tokens all match; return the logit diff."""
    request = golden_request(case)
    prepared = manager.prepare(request)
    assert prepared.input_ids.tolist() == case["input_ids"], "prompt ids differ from transformers'"

    # One-shot prefill, and the production path that splits the prompt after the image to
    # reuse that prefix's KV cache (run twice: filling the cache, then hitting it).
    logit_diff = 0.0
    for image_key in (None, prepared.image_key, prepared.image_key):
        state = manager.backend.prefill(
            prepared.input_ids, prepared.image_features, manager.facts.image_token_id, image_key
        )
        diff = float(np.abs(state.logits - case["arrays"]["prefill_logits_last"]).max())
        assert diff < LOGIT_TOLERANCE, f"prefill logits differ by {diff} (image_key={image_key})"
        logit_diff = max(logit_diff, diff)

    result = manager.generate_text(request)
    assert list(result.token_ids) == case["output_ids"]
    assert result.finish_reason.value == case["finish_reason"]
    assert result.text == case["text"]
    assert result.input_tokens == len(case["input_ids"])
    assert result.generated_tokens == len(case["output_ids"])
    return logit_diff
