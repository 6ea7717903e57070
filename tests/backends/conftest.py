"""Fixtures for the backend tests: the tiny model with quantized decoders beside its fp32 one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tools.quantize_model import quantize_decoder


@pytest.fixture(scope="session")
def quantized_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    model_dir = tmp_path_factory.mktemp("quantized") / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    for precision in ("int8", "q4"):
        quantize_decoder(model_dir, precision)
    return model_dir
