"""The benchmark runs end to end (--quick, tiny model). It checks that it works, never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.reference
ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_produces_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, "benchmarks/run_benchmark.py", "--quick", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["memory_read_gb_s"] > 0
    engines = {r["engine"]: r for r in report["results"]}
    assert set(engines) == {"lumen-fp32", "lumen-int8", "lumen-q4", "transformers"}
    for r in engines.values():
        for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "peak_rss_mb", "load_ms"):
            assert r[key] > 0, (r["engine"], key)
    assert "| lumen-q4 |" in result.stdout
