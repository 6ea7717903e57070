"""Shared fixtures: the committed tiny FastVLM and the goldens transformers produced for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_MODEL = FIXTURES / "tiny-fastvlm"
GOLDEN = FIXTURES / "golden"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def golden() -> dict[str, Any]:
    return load_golden(GOLDEN)


def load_golden(golden_dir: Path) -> dict[str, Any]:
    """golden.json's cases, each with its image bytes and reference arrays attached."""
    data = json.loads((golden_dir / "golden.json").read_text(encoding="utf-8"))
    arrays = np.load(golden_dir / "golden_arrays.npz")
    for case in data["cases"]:
        case["image_bytes"] = (golden_dir / case["image"]).read_bytes()
        prefix = case["name"] + "."
        case["arrays"] = {k[len(prefix) :]: arrays[k] for k in arrays.files if k.startswith(prefix)}
    return data


@pytest.fixture(scope="session")
def manager(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager

    model = FastVLMModelManager.from_model_dir(tiny_model_dir)
    yield model
    model.close()
