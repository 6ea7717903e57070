"""The benchmark runs end to end (--quick, tiny model). It checks that it works, never a speed.

The concurrency mode's figures come from the token times its clock records; the functions that
turn those times into figures are checked here on times made up for the purpose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_benchmark import (  # noqa: E402
    PREFILL_INT8_ENGINES,
    STREAMS,
    VISION_INT8_ENGINES,
    Stream,
    aggregate_decode_tok_s,
    engine_precisions,
    gaps_while_joining_ms,
)


@pytest.mark.reference
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
    assert "concurrency" not in engines["transformers"]
    for name in ("lumen-fp32", "lumen-int8", "lumen-q4"):
        concurrency = engines[name]["concurrency"]
        runs = {run["streams"]: run for run in concurrency["runs"]}
        assert tuple(runs) == STREAMS, name
        for count, run in runs.items():
            assert len(run["cold_ttft_ms"]) == count and min(run["cold_ttft_ms"]) > 0, (name, count)
            assert len(run["cold_vision_ms"]) == count, (name, count)  # each stream's photo was encoded
            assert run["per_stream_decode_tok_s"] > 0, (name, count)
        assert runs[1]["aggregate_decode_tok_s"] == pytest.approx(runs[1]["per_stream_decode_tok_s"])
        assert runs[1]["join_gaps"] == 0  # nothing joins a stream that is alone
        burst = concurrency["burst"]
        assert burst["photos"] == 16 and len(burst["at_once_ttft_ms"]) == 16
        assert burst["at_once_per_min"] > 0 and burst["one_after_another_per_min"] > 0
        assert concurrency["slot_bytes"] > 0 and concurrency["peak_rss_mb"] > 0
        assert concurrency["kv_budget_bytes"] == concurrency["slot_bytes"] * concurrency["max_concurrency"]
    assert "## Concurrency" in result.stdout and "| lumen-fp32 | 8 |" in result.stdout


def stream(submitted: float, *token_times: float) -> Stream:
    return Stream(submitted, list(token_times), generated_tokens=len(token_times))


def test_aggregate_decode_counts_the_tokens_of_the_window_in_which_every_stream_decodes() -> None:
    # a decodes from 1.0 to 5.0, b from 2.0 to 6.0: both decode from 2.0 to 5.0, where a has
    # tokens at 3, 4, 5 and b at 3, 4, 5 (its first token, at 2.0, is prefill's, not decode's).
    a = stream(0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    b = stream(0.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert aggregate_decode_tok_s([a, b]) == pytest.approx(6 / 3.0)
    assert aggregate_decode_tok_s([a]) == pytest.approx(4 / 4.0)  # alone: its decode tokens over its decode


def test_aggregate_decode_is_none_when_the_streams_never_all_decode() -> None:
    assert aggregate_decode_tok_s([stream(0.0, 1.0, 2.0), stream(0.0, 3.0, 4.0)]) is None


def test_gaps_while_joining_are_the_gaps_that_overlap_another_streams_join() -> None:
    # b is submitted at 2.5 and has its first token at 4.5: a's gaps 2-3, 3-4 and 4-5 overlap
    # that, 1-2 and 5-6 do not; b's own gaps overlap no join but its own.
    a = stream(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    b = stream(2.5, 4.5, 6.5)
    assert gaps_while_joining_ms([a, b]) == [1000.0, 1000.0, 1000.0]


def test_engine_names_give_the_decoder_and_vision_precisions() -> None:
    assert engine_precisions("lumen-q4") == ("q4", None, None)
    assert [engine_precisions(e) for e in VISION_INT8_ENGINES] == [("int8", "int8", None), ("q4", "int8", None)]
    assert [engine_precisions(e) for e in PREFILL_INT8_ENGINES] == [("q4", None, "int8"), ("q4", "int8", "int8")]


def test_vision_benchmark_only_measures_the_asked_recipes_beside_fp32() -> None:
    from vision_encoder import BASELINE, GRAPH_RECIPES, VARIANTS, chosen

    assert {v.graph for v in VARIANTS} <= set(GRAPH_RECIPES)
    picked = [v.graph for v in VARIANTS if chosen(v, ["int8-tool", "int8-static-dense-convs-reduce-range"])]
    assert picked == [BASELINE.graph, "int8-static-dense-convs-reduce-range", "int8-tool"]
    assert [v for v in VARIANTS if chosen(v, None)] == list(VARIANTS)
    dense = [v.level.name for v in VARIANTS if chosen(v, ["int8-static-dense-convs"]) and v != BASELINE]
    assert dense == ["ORT_ENABLE_ALL", "ORT_DISABLE_ALL"]  # the graph with its kernels, and unfused


def test_the_prefill_graphs_check_runs_on_a_model_with_both_decoders(
    quantized_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kernel_checks import prefill_graphs

    prefill_graphs(quantized_model_dir, rounds=1)
    out = capsys.readouterr().out
    assert "a run of 32 tokens after 270" in out
    assert "q4 with int8 prompts / q4: median per-round ratio" in out


def test_the_weight_only_8bit_check_times_every_form_and_measures_its_error() -> None:
    from kernel_checks import WEIGHT_FORMS, weight_only_8bit

    results = weight_only_8bit(layers=1, rounds=1)
    assert set(results) == set(WEIGHT_FORMS)
    assert results["fp32 MatMul"][1] == 0.0  # the reference against itself
    # 8-bit weights with fp32 compute stay close to fp32; 4-bit weights are visibly coarser.
    assert 0.0 < results["8-bit block 32, fp32 compute (level 0)"][1] < 0.05
    assert results["4-bit block 128, int8 compute (level 4)"][1] > results["8-bit block 32, fp32 compute (level 0)"][1]
