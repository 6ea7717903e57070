"""What structured output costs, measured side by side in one run.

    python benchmarks/structured_output.py                 # full size (the model run_benchmark.py builds)
    python benchmarks/structured_output.py --quick         # tiny model: checks the benchmark works

For each precision (fp32 and q4 by default), one engine of one batch slot answers the same photo
question alternately without a constraint and under PhotoPrism's labels schema, --runs times
each, after a warm-up of each, greedy. Greedy, because sampling at temperature 1 costs some
4 ms a token over the full vocabulary and less over the tokens a mask leaves: a sampled
comparison would credit the mask with the sampler's savings.

Decode tok/s is one over a request's median step: the time from one decoder call to the next,
which holds the mask, the sampling and the decoder (a median, so that the machine's other work,
which moves single steps by tens of percent on a shared machine, moves it little). Beside it,
the mask alone: the time to compute the allowed tokens and to mask a full-width row of logits,
per token, over the tokens one constrained answer took. And the labels schema's compile time:
the grammar engine's view of the tokenizer (once per server), then the schema cold, then cached.

On a shared machine the runs' speeds move by more than the grammar costs (fp32 steps here
take either ~35 or ~47 ms, run by run), so the table also gives the grammar's own share of the
constrained runs' steps: the time in its mask and advance calls over the steps' time, measured
inside the same steps. That share is what the constraint adds; the target is judged on it.

The machine's memory read bandwidth is measured at the start, as run_benchmark.py does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_benchmark import (
    CACHE,
    ROOT,
    ensure_model,
    machine_description,
    make_photo,
    memory_read_bandwidth,
    write_report,
)

# PhotoPrism's labels, as its vision prompt asks for them (photoprism#5450 asks for a schema).
LABELS_SCHEMA = {
    "type": "object",
    "properties": {
        "labels": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "topicality": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["name", "confidence", "topicality"],
            },
        }
    },
    "required": ["labels"],
}
QUESTION = [{"role": "user", "content": "List the labels of this photo as JSON: name, confidence, topicality."}]
PRECISIONS = ("fp32", "q4")
MAX_SLOWDOWN = 0.05  # the target: at most 5% slower decoding under a schema


def compile_times(manager: Any) -> dict[str, float]:
    """ms to build the grammar engine's tokenizer, then to compile the labels schema cold and cached."""
    from lumen_vlm.generation import GrammarCompiler, ResponseFormat

    spec = manager.spec
    compiler = GrammarCompiler(manager.tokenizer, spec.decoder.vocab_size, spec.text.eos_token_ids, 1 << 20)
    labels = ResponseFormat("json_schema", json.dumps(LABELS_SCHEMA))
    start = time.perf_counter()
    compiler.grammar_tokenizer()
    tokenizer_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    compiler.compile(labels)
    cold_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    compiler.compile(labels)
    cached_ms = (time.perf_counter() - start) * 1000
    return {
        "grammar_tokenizer_ms": tokenizer_ms,
        "labels_compile_cold_ms": cold_ms,
        "labels_compile_cached_ms": cached_ms,
    }


class StepClock:
    """The model as the engine sees it, stamping each decoder call: with one request in the
    engine, the time between two calls is one whole step (sampling, the mask, the decoder)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.stamps: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def decode(self, cache: Any, slots: Any, tokens: Any) -> Any:
        self.stamps.append(time.perf_counter())
        return self._model.decode(cache, slots, tokens)

    def decode_tok_s(self) -> float:
        """One over the median step: a burst of the machine's other work moves it little."""
        return 1 / statistics.median(np.diff(self.stamps))

    def steps_s(self) -> float:
        return self.stamps[-1] - self.stamps[0]


class MaskClock:
    """The engine's grammar compiler, timing every mask and advance of the constraints it
    starts: the grammar's own share of each step, measured inside the same steps."""

    def __init__(self, compiler: Any) -> None:
        self.inner = compiler
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def compile(self, response_format: Any) -> Any:
        return _TimedGrammar(self.inner.compile(response_format), self)


class _TimedGrammar:
    def __init__(self, grammar: Any, clock: MaskClock) -> None:
        self.format, self._grammar, self._clock = grammar.format, grammar, clock

    def start(self) -> Any:
        return _TimedConstraint(self._grammar.start(), self._clock)


class _TimedConstraint:
    def __init__(self, constraint: Any, clock: MaskClock) -> None:
        self._constraint, self._clock = constraint, clock

    def mask(self, logits: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        masked = self._constraint.mask(logits)
        self._clock.seconds += time.perf_counter() - start
        return masked

    def advance(self, token_id: int) -> None:
        start = time.perf_counter()
        self._constraint.advance(token_id)
        self._clock.seconds += time.perf_counter() - start


def mask_cost_us(compiler: Any, spec: Any, token_ids: tuple[int, ...]) -> dict[str, float]:
    """Per token of one constrained answer: µs to compute the allowed set, and to mask a row."""
    from lumen_vlm.generation import ResponseFormat

    constraint = compiler.compile(ResponseFormat("json_schema", json.dumps(LABELS_SCHEMA))).start()
    width = spec.decoder.vocab_size
    logits = np.random.default_rng(0).standard_normal(width).astype(np.float32)
    eos = spec.text.eos_token_ids
    allowed_s, mask_s = [], []
    for token in token_ids:
        start = time.perf_counter()
        constraint.allowed()
        middle = time.perf_counter()
        constraint.mask(logits)  # computes the allowed set again, then masks
        end = time.perf_counter()
        allowed_s.append(middle - start)
        mask_s.append(end - middle)
        if token in eos:
            break
        constraint.advance(token)
    return {
        "width": width,
        "tokens": len(allowed_s),
        "allowed_us_median": statistics.median(allowed_s) * 1e6,
        "allowed_us_p99": float(np.percentile(allowed_s, 99)) * 1e6,
        "mask_us_median": statistics.median(mask_s) * 1e6,
    }


def run_precision(model_dir: Path, precision: str, runs: int, new_tokens: int) -> dict[str, Any]:
    from lumen_vlm.engine import Engine
    from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, GenerationParams, GenerationRequest
    from lumen_vlm.generation import ResponseFormat
    from lumen_vlm.resources.settings import AdmissionSettings

    optimized = model_dir.parent / "ort-optimized"
    manager = FastVLMModelManager.from_model_dir(model_dir, precision=precision, optimized_graph_dir=optimized)
    clock = StepClock(manager)
    engine = Engine(clock, AdmissionSettings(max_concurrency=1))
    masks = MaskClock(engine.grammars)
    engine.grammars = masks  # type: ignore[assignment]
    photo = make_photo()
    labels = ResponseFormat("json_schema", json.dumps(LABELS_SCHEMA))

    def answer(response_format: ResponseFormat | None) -> tuple[Any, float, float]:
        """The result, its decode tok/s (greedy) and the grammar's share of its decode steps."""
        params = GenerationParams(max_new_tokens=new_tokens, response_format=response_format)
        clock.stamps.clear()
        masks.seconds = 0.0
        result = engine.submit(GenerationRequest(QUESTION, photo, params)).result()
        return result, clock.decode_tok_s(), masks.seconds / clock.steps_s()

    try:
        compiled = compile_times(manager)
        answer(None), answer(labels)  # warm-up: the photo's features and prefix are cached after it
        free, constrained = [], []
        for _ in range(runs):  # interleaved, so a change of machine load touches both
            free.append(answer(None))
            constrained.append(answer(labels))
        mask = mask_cost_us(masks.inner, engine.model.spec, constrained[0][0].token_ids)
    finally:
        engine.close()
        manager.close()
    free_runs = [tok_s for _, tok_s, _ in free]
    constrained_runs = [tok_s for _, tok_s, _ in constrained]
    return {
        "precision": precision,
        "free_decode_tok_s": statistics.median(free_runs),
        "constrained_decode_tok_s": statistics.median(constrained_runs),
        "slowdown": 1 - statistics.median(constrained_runs) / statistics.median(free_runs),
        "best_free_decode_tok_s": max(free_runs),
        "best_constrained_decode_tok_s": max(constrained_runs),
        "best_slowdown": 1 - max(constrained_runs) / max(free_runs),
        "grammar_share_of_steps": statistics.median(share for _, _, share in constrained),
        "free_decode_tok_s_runs": free_runs,
        "constrained_decode_tok_s_runs": constrained_runs,
        "free_tokens": [r.generated_tokens for r, _, _ in free],
        "constrained_tokens": [r.generated_tokens for r, _, _ in constrained],
        "constrained_valid_json": sum(_parses(r.text) for r, _, _ in constrained),
        "constrained_example": constrained[0][0].text[:200],
        "mask": mask,
        **compiled,
    }


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def report_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    bandwidth = report["memory_read_gb_s"]
    lines = [
        "## Structured output",
        "",
        f"{machine['cpu']}, {machine['logical_cores']} logical cores, memory read {bandwidth:.1f} GB/s; "
        f"ONNX Runtime {machine['onnxruntime']}. One batch slot; the same photo question free and under "
        f"PhotoPrism's labels schema, interleaved, {report['runs']} runs each after a warm-up, greedy, "
        f"up to {report['new_tokens']} new tokens; decode tok/s is one over a run's median step, then the "
        "median of the runs. "
        "`python benchmarks/structured_output.py` reproduces it.",
        "",
        "| precision | decode tok/s free / under the schema: median of runs | slower by | best run | slower by "
        "| the grammar's share of the steps | target <= 5% | allowed set µs/token (median, p99) "
        "| masking the row µs/token | tokens (free / schema) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        mask = r["mask"]
        met = "met" if r["grammar_share_of_steps"] <= MAX_SLOWDOWN else "missed"
        lines.append(
            f"| {r['precision']} | {r['free_decode_tok_s']:.1f} / {r['constrained_decode_tok_s']:.1f} "
            f"| {100 * r['slowdown']:.1f}% | {r['best_free_decode_tok_s']:.1f} / "
            f"{r['best_constrained_decode_tok_s']:.1f} | {100 * r['best_slowdown']:.1f}% "
            f"| {100 * r['grammar_share_of_steps']:.2f}% | {met} "
            f"| {mask['allowed_us_median']:.0f}, {mask['allowed_us_p99']:.0f} | {mask['mask_us_median']:.0f} "
            f"| {statistics.median(r['free_tokens']):.0f} / {statistics.median(r['constrained_tokens']):.0f} |"
        )
    first = report["results"][0]
    lines += [
        "",
        f"The mask is {first['mask']['width']} logits wide. Compiling the labels schema: the grammar engine's view "
        f"of the tokenizer {first['grammar_tokenizer_ms']:.0f} ms (once per server; the server builds it as it "
        f"starts), then the schema cold {first['labels_compile_cold_ms']:.2f} ms and cached "
        f"{first['labels_compile_cached_ms'] * 1000:.0f} µs.",
        "",
    ]
    return "\n".join(lines)


def tiny_copy(model_dir: Path) -> None:
    """The committed tiny model with a q4 decoder beside its fp32 one (no torch needed)."""
    sys.path.insert(0, str(ROOT))
    from tools.quantize_model import quantize_decoder

    shutil.copytree(ROOT / "tests/fixtures/tiny-fastvlm", model_dir)
    quantize_decoder(model_dir, "q4")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 run: a smoke test, not a measurement")
    parser.add_argument("--model-dir", type=Path, help="use (and cache) the model here")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    runs, new_tokens = (1, 16) if args.quick else (args.runs, args.new_tokens)
    temporary = Path(tempfile.mkdtemp(prefix="lumen-vlm-bench-")) if args.quick and not args.model_dir else None
    model_dir = (temporary / "tiny") if temporary else (args.model_dir or CACHE / "fastvlm-0.5b-random").expanduser()
    try:
        if temporary:
            tiny_copy(model_dir)
        else:
            ensure_model(model_dir, "full")
        bandwidth = memory_read_bandwidth(0.25 if args.quick else 1.0) / 1e9
        results = [run_precision(model_dir, precision, runs, new_tokens) for precision in args.precisions]
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    report = {
        "machine": machine_description(),
        "memory_read_gb_s": bandwidth,
        "runs": runs,
        "new_tokens": new_tokens,
        "results": results,
    }
    write_report(report, report_markdown(report), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
