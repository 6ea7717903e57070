"""Shared fixtures: the committed tiny FastVLM and the goldens transformers produced for it."""

from __future__ import annotations

import functools
import importlib.util
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
# What the [tools] extra adds for the reference tests (the `reference` marker): transformers'
# FastVLM and what builds the test model. tests/test_packaging.py checks it against pyproject.
REFERENCE_STACK = ("torch", "transformers", "timm", "onnxscript", "dashscope", "tiktoken")


@functools.cache
def missing_reference_stack() -> tuple[str, ...]:
    return tuple(name for name in REFERENCE_STACK if importlib.util.find_spec(name) is None)


def reference_skip_reason() -> str | None:
    """Why the reference tests cannot run here, or None when they can."""
    missing = missing_reference_stack()
    return f"needs the [tools] extra ({', '.join(missing)} not installed)" if missing else None


def skip_module_without_reference_stack() -> None:
    """For a module that imports the reference stack at import time: skip it whole, as skipped."""
    reason = reference_skip_reason()
    if reason:
        pytest.skip(reason, allow_module_level=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Without the [tools] extra every reference test is skipped (reported as skipped), never run."""
    if item.get_closest_marker("reference") and (reason := reference_skip_reason()):
        pytest.skip(reason)


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


@pytest.fixture(scope="session")
def quantized_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model with int8 and q4 decoders beside its fp32 one (for tests/backends and tests/graphs)."""
    from tools.quantize_model import quantize_decoder

    model_dir = tmp_path_factory.mktemp("quantized") / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    for precision in ("int8", "q4"):
        quantize_decoder(model_dir, precision, int8_form="integer")  # the same graphs on every CPU
    return model_dir


@pytest.fixture(scope="session")
def fused_manager(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The tiny model with its attention fused: the engine's batched path (the CPU provider's)."""
    from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager

    model = FastVLMModelManager.from_model_dir(
        tiny_model_dir, optimized_graph_dir=tmp_path_factory.mktemp("ort-optimized")
    )
    assert model.backend.fused_attention_layers > 0, "the tiny model's attention should fuse"
    yield model
    model.close()
