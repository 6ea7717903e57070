"""Fixtures the graph rewrites' tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from .decoders import decoder_path


@pytest.fixture
def q4_decoder(tiny_model_dir: Path, tmp_path: Path) -> Path:
    from tools.quantize_model import quantize_q4

    target = tmp_path / "decoder_q4.onnx"
    quantize_q4(decoder_path(tiny_model_dir), target)
    return target
