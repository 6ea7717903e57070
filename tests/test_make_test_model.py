"""The test-model tool still works: regenerate a tiny model and check the engine against it.

This keeps tools/make_test_model.py from rotting: transformers' reference is rebuilt and
exported from scratch, and the ONNX engine must reproduce its fresh goldens exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager

from .conftest import GOLDEN, TINY_MODEL, load_golden
from .parity import assert_case_matches

pytestmark = pytest.mark.reference
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("regenerated")
    model_dir, golden_dir = out / "model", out / "golden"
    command = [sys.executable, "tools/make_test_model.py", "--out", str(model_dir), "--golden", str(golden_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return model_dir, golden_dir


def test_regenerated_model_matches_its_fresh_goldens(regenerated: tuple[Path, Path]) -> None:
    model_dir, golden_dir = regenerated
    golden = load_golden(golden_dir)
    manager = FastVLMModelManager.from_model_dir(model_dir)
    diffs = [assert_case_matches(manager, case) for case in golden["cases"]]
    assert max(diffs) < 1e-4


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json"]
)
def test_committed_fixture_is_what_the_tool_makes(regenerated: tuple[Path, Path], name: str) -> None:
    model_dir, _ = regenerated
    fresh = json.loads((model_dir / name).read_text())
    committed = json.loads((TINY_MODEL / name).read_text())
    assert without_version_stamps(fresh) == without_version_stamps(committed)


def without_version_stamps(document: Any) -> Any:
    """`document` without the transformers version that saved it: a fresh install may bring a
    newer transformers (>=5.0,<6), which writes its own version into each config and changes
    nothing else."""
    if isinstance(document, dict):
        return {key: without_version_stamps(value) for key, value in document.items() if key != "transformers_version"}
    if isinstance(document, list):
        return [without_version_stamps(value) for value in document]
    return document


def test_committed_tokenizer_is_what_the_tool_makes(regenerated: tuple[Path, Path]) -> None:
    model_dir, _ = regenerated
    assert (model_dir / "tokenizer.json").read_bytes() == (TINY_MODEL / "tokenizer.json").read_bytes()


def test_committed_golden_prompts_are_what_the_tool_makes(regenerated: tuple[Path, Path]) -> None:
    _, golden_dir = regenerated
    fresh = json.loads((golden_dir / "golden.json").read_text())["cases"]
    committed = json.loads((GOLDEN / "golden.json").read_text())["cases"]
    assert [c["input_ids"] for c in fresh] == [c["input_ids"] for c in committed]
