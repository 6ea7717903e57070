"""Which ONNX Runtime session options serve the decoder best, measured side by side in one run.

    python benchmarks/session_options.py [--model-dir DIR] [--precisions fp32 q4] [--steps 32]

Each variant loads the decoder afresh, prefills the same ~300-token prompt and decodes the same
tokens, the variants taking turns --repeats times; the table gives medians and each variant's
speed relative to the engine's defaults: ORT's session defaults, and the rewritten decoder the
server saves and uses. One variant runs the decoder graph as exported, without the rewrites.
Uses the model run_benchmark.py builds (run it once first).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from run_benchmark import CACHE  # the sibling script (benchmarks/ is on sys.path)
from tokenizers import Tokenizer

from lumen_vlm.backends.kv_cache import KVCache
from lumen_vlm.backends.onnxrt_backend import FastVLMONNXBackend, default_session_options
from lumen_vlm.resources.model_files import locate_model_files, read_file_spec

DEFAULT_MODEL = CACHE / "fastvlm-0.5b-random"


def variants() -> dict[str, dict[str, object]]:
    return {
        "defaults": {},
        "decoder graph as exported": {"rewritten": False},
        "1 thread": {"threads": 1},
        "no spinning": {"spinning": False},
        "no memory arena": {"arena": False},
        "basic graph optimizations": {"level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC},
    }


def session_options(threads: int = 0, spinning: bool = True, arena: bool = True, level: object = None) -> object:
    """The engine's defaults with one knob turned."""
    options = default_session_options(threads)
    if level is not None:
        options.graph_optimization_level = level
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def load(model_dir: Path, precision: str, knobs: dict[str, object]) -> FastVLMONNXBackend:
    knobs = dict(knobs)
    rewritten = bool(knobs.pop("rewritten", True))
    files = locate_model_files(model_dir, precision)
    # The server's cache of rewritten graphs, beside the model (run_benchmark.py fills it). A
    # variant with another optimization level gets a cache of its own: ORT's saved graphs
    # depend on the level, and would otherwise replace the server's.
    cache = model_dir.parent / ("ort-optimized" if "level" not in knobs else "ort-optimized-other-level")
    return FastVLMONNXBackend(
        files,
        providers=["CPUExecutionProvider"],
        session_options=session_options(**knobs),
        context_length=read_file_spec(files, Tokenizer.from_file(str(files.tokenizer)).token_to_id).text.context_length,
        optimized_graph_dir=cache if rewritten else None,
    )


def prefill(backend: FastVLMONNXBackend, prompt: np.ndarray, reserve: int) -> KVCache:
    """The prompt in one decoder call, into a one-slot KV cache with room for `reserve` more."""
    cache = backend.new_kv_cache(1, prompt.size + reserve)
    backend.forward(cache, [0], backend.embed(prompt)[None])
    return cache


def measure_once(backend: FastVLMONNXBackend, steps: int) -> tuple[float, float]:
    """(prefill ms, decode tok/s) after a warm-up prefill."""
    prompt = np.arange(1000, 1300, dtype=np.int64)
    prefill(backend, prompt, 0)
    start = time.perf_counter()
    cache = prefill(backend, prompt, steps)
    prefill_ms = (time.perf_counter() - start) * 1000.0
    start = time.perf_counter()
    for step in range(steps):
        backend.forward(cache, [0], backend.embed(np.array([2000 + step], dtype=np.int64))[None])
    return prefill_ms, steps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "q4"])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| precision | variant | prefill ms | decode tok/s | decode vs defaults |")
    print("|---|---|---|---|---|")
    for precision in args.precisions:
        # Round-robin: each repeat loads and measures every variant in turn, so the machine's
        # drift (its memory bandwidth moves with the neighbours) falls on all of them alike.
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants()}
        for _ in range(args.repeats):
            for name, knobs in variants().items():
                samples[name].append(measure_once(load(args.model_dir, precision, knobs), args.steps))
        baseline = statistics.median(tok_s for _, tok_s in samples["defaults"])
        for name, runs in samples.items():
            prefill_ms = statistics.median(ms for ms, _ in runs)
            tok_s = statistics.median(t for _, t in runs)
            print(f"| {precision} | {name} | {prefill_ms:.0f} | {tok_s:.1f} | {tok_s / baseline:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
