"""The ONNX engine against transformers' own FastVLM: token-identical greedy output."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from lumen_vlm.fastvlm.image import image_to_pixels
from lumen_vlm.resources.model_spec import ResizeMode

from .parity import assert_case_matches


def case_ids(golden: dict[str, Any]) -> list[str]:
    return [case["name"] for case in golden["cases"]]


@pytest.fixture(params=range(6), ids=lambda i: f"case{i}")
def case(request: pytest.FixtureRequest, golden: dict[str, Any]) -> dict[str, Any]:
    if request.param >= len(golden["cases"]):
        pytest.fail("golden has fewer cases than the test expects")
    return golden["cases"][request.param]


def test_golden_covers_the_required_cases(golden: dict[str, Any]) -> None:
    cases = {case["name"]: case for case in golden["cases"]}
    assert len({case["image"] for case in cases.values()}) >= 2
    assert any(m["role"] == "system" for m in cases["system_prompt"]["messages"])
    assert sum(m["role"] == "user" for m in cases["multi_turn"]["messages"]) >= 2
    assert any(ord(ch) > 0x2E80 for m in cases["cjk_emoji"]["messages"] for ch in m["content"])
    # The same question about two photos must give two answers, or parity proves little.
    assert cases["describe"]["output_ids"] != cases["describe_portrait"]["output_ids"]


def test_pixels_match_the_reference_processor(manager, case: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    spec = replace(manager.spec.image, mode=ResizeMode(case["resize_mode"]))
    pixels = image_to_pixels(case["image_bytes"], spec)
    np.testing.assert_allclose(pixels, case["arrays"]["pixel_values"], atol=1e-6, rtol=0)


def test_greedy_generation_is_token_identical(manager, case: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    assert_case_matches(manager, case)
