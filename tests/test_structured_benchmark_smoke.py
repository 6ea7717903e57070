"""benchmarks/structured_output.py runs end to end (--quick, the tiny model). It checks that it
works and reports every figure, never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_structured_output_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    command = [sys.executable, "benchmarks/structured_output.py", "--quick", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["memory_read_gb_s"] > 0
    assert [r["precision"] for r in report["results"]] == ["fp32", "q4"]
    for r in report["results"]:
        assert r["free_decode_tok_s"] > 0 and r["constrained_decode_tok_s"] > 0
        assert r["mask"]["width"] == 4032  # the tiny model's logits, padding ids included
        assert r["mask"]["tokens"] > 0 and r["mask"]["allowed_us_median"] > 0
        assert r["constrained_example"].startswith('{"labels": [')  # the schema applied
        assert 0 < r["labels_compile_cached_ms"] < r["labels_compile_cold_ms"]
    assert "## Structured output" in result.stdout and "| q4 |" in result.stdout
