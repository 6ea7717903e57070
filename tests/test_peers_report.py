"""benchmarks/peers.py's report: the class-by-class ratios it prints from its rounds.

The peers themselves (llama.cpp, onnxruntime-genai) are the [bench] extra and are not run here;
the arithmetic that turns their rounds into ratios is checked on rounds made up for the purpose.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import CANDIDATES, PREFILL_ENGINES, accuracy, best_llama, class_rows, median_ratio, workload  # noqa: E402


def engine(step_ms: list[float], prefill_ms: list[float]) -> dict[str, Any]:
    runs = [{"step_ms": s, "prefill_ms": p} for s, p in zip(step_ms, prefill_ms, strict=True)]
    return {"runs": runs, "file_bytes": 1, "max_abs_logit_diff": 0.0, "top1_agreement": 1.0}


def test_llama_is_taken_at_its_best_setting_round_by_round() -> None:
    report = {
        "engines": {
            "llama-Q4_0-fa0": engine([10.0, 30.0], [100.0, 300.0]),
            "llama-Q4_0-fa1": engine([20.0, 15.0], [50.0, 400.0]),
        }
    }
    assert best_llama(report, "llama-Q4_0", "step_ms") == [10.0, 15.0]
    assert best_llama(report, "llama-Q4_0", "prefill_ms") == [50.0, 300.0]


def test_ratios_are_medians_of_per_round_ratios() -> None:
    # Round by round, ours is 2x, 3x and 4x the peer's speed: the median of the ratios is 3x,
    # while the ratio of the medians would be 30 / 12 = 2.5x.
    assert median_ratio([20.0, 30.0, 80.0], [10.0, 10.0, 20.0]) == 3.0


def test_class_rows_set_ours_beside_each_peer() -> None:
    ours_step, ours_prefill = [10.0, 10.0, 10.0], [100.0, 100.0, 100.0]
    report = {"engines": {name: engine(ours_step, ours_prefill) for name in ("lumen-fp32", "lumen-int8")}}
    report["engines"].update(
        {
            "lumen-q4": engine([5.0, 5.0, 5.0], [200.0, 200.0, 200.0]),
            "genai-fp32": engine([20.0, 20.0, 20.0], [50.0, 50.0, 50.0]),
            "genai-int8": engine(ours_step, ours_prefill),
            "genai-int4": engine(ours_step, ours_prefill),
        }
    )
    for name in ("llama-F16", "llama-Q8_0", "llama-Q4_0"):
        report["engines"][f"{name}-fa0"] = engine([10.0, 10.0, 10.0], [400.0, 400.0, 400.0])
        report["engines"][f"{name}-fa1"] = engine([8.0, 8.0, 8.0], [500.0, 500.0, 500.0])
    for name in [c.name for c in CANDIDATES] + list(PREFILL_ENGINES):
        report["engines"][name] = engine(ours_step, ours_prefill)
    rows = {line.split("|")[2].strip(): line for line in class_rows(report)[2:]}
    assert "| 2.00x | 2.00x |" in rows["lumen-fp32 / genai-fp32"]  # twice genai's speed, twice its prefill time
    assert "| 0.80x | 0.25x |" in rows["lumen-fp32 / llama-F16"]  # llama's best step (8 ms), best prefill
    assert "| 1.60x | 0.50x |" in rows["lumen-q4 / llama-Q4_0"]
    assert "lumen-q4-b32-sym / llama-Q4_0" in rows and "lumen-int8-nbits / genai-int8" in rows
    assert "lumen-q4-prefill-int8 / llama-Q4_0" in rows and "lumen-q4-prefill-int8 / genai-int4" in rows


def test_accuracy_counts_top1_agreement_over_positions() -> None:
    reference = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]], dtype=np.float32)
    other = np.array([[0.0, 1.5, 0.0], [0.0, 0.5, 0.0]], dtype=np.float32)
    result = accuracy(other, reference)
    assert result["top1_agreement"] == 0.5
    assert result["max_abs_logit_diff"] == 2.0


def test_the_workload_is_seeded_and_below_the_special_tokens() -> None:
    prompt, steps = workload(1000)
    again, _ = workload(1000)
    assert np.array_equal(prompt, again)
    assert prompt.max() < 1000 and steps.max() < 1000
