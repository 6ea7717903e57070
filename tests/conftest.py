"""Shared fixtures: the committed tiny FastVLM and the goldens transformers produced for it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_MODEL = FIXTURES / "tiny-fastvlm"
GOLDEN = FIXTURES / "golden"


_HOME_VARIABLES = ("HOME", "XDG_CACHE_HOME", "HF_HOME")
_saved_home: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Every test, and every process a test starts, gets a temporary home and cache.

    The code's defaults (``~/.cache/lumen``, Hugging Face's and torch's caches) expand ``~``; pointing HOME and
    XDG_CACHE_HOME at a temporary directory before any test module is imported keeps the suite out of the real
    home, whatever a test forgets to pass.
    """
    home = Path(tempfile.mkdtemp(prefix="lumen-vlm-test-home-"))
    _saved_home.update({name: os.environ.get(name) for name in _HOME_VARIABLES})
    os.environ.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HOME=str(home / ".cache" / "huggingface"))


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _saved_home:
        return
    home = os.environ["HOME"]
    for name, value in _saved_home.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(home, ignore_errors=True)


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
