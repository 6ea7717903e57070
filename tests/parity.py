"""Checks that the ONNX engine reproduces transformers' golden outputs; shared by two test files."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from lumen_vlm.engine import Engine, GenerationResult
from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, GenerationParams, GenerationRequest, PreparedRequest
from lumen_vlm.resources.model_spec import ResizeMode
from lumen_vlm.resources.settings import AdmissionSettings

LOGIT_TOLERANCE = 1e-4


def generate_text(manager: FastVLMModelManager, request: GenerationRequest) -> GenerationResult:
    """One request through an engine of one slot, to its result."""
    engine = Engine(manager, AdmissionSettings(max_concurrency=1))
    try:
        return engine.submit(request).result()
    finally:
        engine.close()


def prefill_logits(manager: FastVLMModelManager, prepared: PreparedRequest, chunk_tokens: int = 4096) -> np.ndarray:
    """The first token's logits, prefilled into a slot of its own (through the prefix cache
    when the request has an image key)."""
    cache = manager.new_kv_cache(1, int(prepared.input_ids.size) + 1)
    *_, logits = manager.prefill(prepared, cache, 0, chunk_tokens)
    return logits


def prompt_logits(backend: Any, ids: np.ndarray) -> np.ndarray:
    """The runtime alone: `ids`' embeddings through the decoder in one run; the last logits."""
    cache = backend.new_kv_cache(1, int(ids.size) + 1)
    return backend.forward(cache, [0], backend.embed(ids)[None])[0]


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
        logits = prefill_logits(manager, replace(prepared, image_key=image_key))
        diff = float(np.abs(logits - case["arrays"]["prefill_logits_last"]).max())
        assert diff < LOGIT_TOLERANCE, f"prefill logits differ by {diff} (image_key={image_key})"
        logit_diff = max(logit_diff, diff)

    result = generate_text(manager, request)
    assert list(result.token_ids) == case["output_ids"]
    assert result.finish_reason.value == case["finish_reason"]
    assert result.text == case["text"]
    assert result.input_tokens == len(case["input_ids"])
    assert result.generated_tokens == len(case["output_ids"])
    return logit_diff
