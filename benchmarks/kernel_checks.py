"""Small checks of ONNX Runtime's CPU kernels behind the peers section's conclusions.

    python benchmarks/kernel_checks.py profile GRAPH [--depth 292] [--steps 40]
    python benchmarks/kernel_checks.py fp16
    python benchmarks/kernel_checks.py lm-head
    python benchmarks/kernel_checks.py accuracy-levels [--rows 1]
    python benchmarks/kernel_checks.py weight-only-8bit
    python benchmarks/kernel_checks.py vision-arena GRAPH [--model-dir DIR]
    python benchmarks/kernel_checks.py prefill-graphs [--model-dir DIR] [--rounds 12]

profile: ORT's profiler over decode steps of a decoder graph (our rewritten one from
  <cache_dir>/ort-optimized/*-decoder/model.onnx, or onnxruntime-genai's model.onnx): one new
  token after `--depth` past positions of random KV, past and present in separate buffers; the
  time per op type, per step.
fp16: 24 decode-shaped MatMuls (M = 1, 896 x 4864) with fp32 weights and with fp16 weights, in
  turns: whether half the bytes is faster on this CPU, and which ops ORT runs for fp16.
lm-head: FastVLM-0.5B's lm_head shape (M = 1, K = 896, N = 151936) as MatMulNBits in several
  forms, in turns, with each form's relative output error against fp32.
accuracy-levels: a decode step's weight matmuls (M = `--rows`, 1 by default; 292 is a 1024 px
  photo's prefill; six layers' worth of the joined q/k/v, o, joined gate/up and down shapes) as
  4-bit MatMulNBits, block 128 with zero points, at each accuracy level (0-4: the compute type
  MLAS uses), in turns.
weight-only-8bit: the same six layers' matmuls at M = 1 with fp32 weights, and as MatMulNBits
  with 8-bit symmetric weights and fp32 activations (accuracy level 0 or 1, block 32 or 128),
  beside our int8 and q4 forms (level 4, int8 activations), 5 rounds in turns, with each form's
  relative output error against fp32: whether 8-bit weight-only quantization could be a class
  between fp32 and int8 on this ONNX Runtime.
vision-arena: a vision graph of the model (e.g. MODEL_DIR/onnx/vision_encoder.onnx) with ORT's
  CPU memory arena on and off, opened directly and through the server's saved-optimized-graph
  cache, 6 rounds in turns on one of scikit-image's photos: what the server's arena-off vision
  session costs.
prefill-graphs: the model's q4 and int8 decoders as the server runs them (FastVLMModelManager,
  rewritten graphs): first one run of M = 1..32 tokens after 270 positions through each, in
  turns (where `PREFILL_GRAPH_MIN_TOKENS` comes from); then a 292-token prompt (a 1024 px photo's)
  prefilled by q4 alone, int8 alone, and q4 with int8 prompts (`prefill_precision: int8`), the
  three loaded together and run in a rotating order over `--rounds` rounds. The model directory
  needs both decoders (`tools/quantize_model.py`); by default the benchmark's model.

2 intra-op threads throughout; random weights (speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

THREADS = 2
# run_benchmark.py's model (its CACHE / "fastvlm-0.5b-random").
BENCH_MODEL = Path(os.environ.get("LUMEN_VLM_BENCH_CACHE", "~/.cache/lumen-vlm/bench")).expanduser() / (
    "fastvlm-0.5b-random"
)


def session(model: bytes | str, profile_prefix: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def mean_ms(run: Callable[[], object], calls: int) -> float:
    """Mean milliseconds a call over `calls` calls, after 3 warm-up calls."""
    for _ in range(3):
        run()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - started) / calls * 1000


def as_matmul_nbits(model: onnx.ModelProto, bits: int, block: int, symmetric: bool, accuracy_level: int) -> bytes:
    """The model with every MatMul quantized to MatMulNBits (ORT's quantizer, as our tools call it).

    The quantizer rewrites `model` itself, so a caller wanting several forms builds one model each.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per matmul otherwise
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=accuracy_level
    )
    quantizer.process()
    return quantizer.model.model.SerializeToString()


# --------------------------------------------------------------------------- profile


def decode_feeds(sess: ort.InferenceSession, depth: int) -> dict[str, np.ndarray]:
    """One new token after `depth` positions, for either engine's input names."""
    rng = np.random.default_rng(0)
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    feeds = {}
    for value in sess.get_inputs():
        dtype = types[value.type]
        if value.name == "inputs_embeds":
            feeds[value.name] = (rng.standard_normal((1, 1, value.shape[2])) * 0.1).astype(dtype)
        elif value.name == "input_ids":
            feeds[value.name] = np.array([[100]], dtype=dtype)
        elif value.name == "position_ids":
            feeds[value.name] = np.array([[depth]], dtype=dtype)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((1, depth + 1), dtype=dtype)
        elif "past" in value.name:  # [batch, kv heads, past positions, head size]
            head_size = 64 if value.shape[3] == "kv_cache_dim" else value.shape[3]
            feeds[value.name] = (rng.standard_normal((1, value.shape[1], depth, head_size)) * 0.5).astype(dtype)
        else:
            raise SystemExit(f"input {value.name} {value.shape}: not a decoder input this check knows")
    return feeds


def profile(graph: Path, depth: int, steps: int) -> None:
    prefix = str(Path(tempfile.mkdtemp()) / "profile")
    sess = session(str(graph), prefix)
    feeds = decode_feeds(sess, depth)
    wall = mean_ms(lambda: sess.run(None, feeds), steps)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = steps + 3
    by_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    print(f"{graph}: {wall:.2f} ms a step (mean, profiler on), depth {depth}")
    for op, microseconds in by_op.most_common():
        print(f"  {op:34s} {microseconds / runs / 1000:7.3f} ms  x{count[op] // runs}")


# --------------------------------------------------------------------------- fp16


def matmuls(dtype: type, count: int = 24, k: int = 896, n: int = 4864) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT16 if dtype is np.float16 else TensorProto.FLOAT
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.random((k, n)) - 0.5).astype(dtype), f"w{i}") for i in range(count)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(count)]
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info("x", elem, [1, k])],
        [helper.make_tensor_value_info(f"y{i}", elem, None) for i in range(count)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def fp16() -> None:
    sessions = {dtype: session(matmuls(dtype)) for dtype in (np.float32, np.float16)}
    for round_ in range(2):
        for dtype, sess in sessions.items():
            x = {"x": np.ones((1, 896), dtype)}
            ms = mean_ms(lambda sess=sess, x=x: sess.run(None, x), 40)
            megabytes = 24 * 896 * 4864 * np.dtype(dtype).itemsize / 1e6
            print(f"round {round_}, {np.dtype(dtype).name} weights: {ms:.2f} ms for {megabytes:.0f} MB")
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    optimized = Path(tempfile.mkdtemp()) / "fp16.onnx"
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(matmuls(np.float16), options, providers=["CPUExecutionProvider"])
    print("ops ORT runs for fp16 weights:", sorted({node.op_type for node in onnx.load(str(optimized)).graph.node}))


# --------------------------------------------------------------------------- lm-head


LM_HEAD_FORMS = {  # name: (bits, block size, symmetric)
    "4-bit block 32 symmetric": (4, 32, True),
    "4-bit block 128 zero points": (4, 128, False),
    "4-bit block 128 symmetric": (4, 128, True),
    "8-bit block 128 symmetric": (8, 128, True),
}


def lm_head() -> None:
    from onnx import TensorProto, helper, numpy_helper

    k, n = 896, 151936
    weight = (np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((1, 1, k)).astype(np.float32)
    reference = x[0] @ weight
    sessions = {}
    for name, (bits, block, symmetric) in LM_HEAD_FORMS.items():
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="lm_head")],
            "lm_head",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        sessions[name] = session(as_matmul_nbits(model, bits, block, symmetric, accuracy_level=4))
        got = sessions[name].run(None, {"x": x})[0][0]
        print(f"{name}: relative error {np.linalg.norm(got - reference) / np.linalg.norm(reference):.4f}")
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(5):
        for name, sess in sessions.items():
            times[name].append(mean_ms(lambda sess=sess: sess.run(None, {"x": x}), 20))
    for name, values in times.items():
        print(f"{name}: median {np.median(values):.2f} ms over 5 rounds")


# --------------------------------------------------------------------------- accuracy levels


LAYER_SHAPES = ((896, 1152), (896, 896), (896, 9728), (4864, 896))  # FastVLM-0.5B's, as K x N


def decode_matmuls(rows: int, layers: int = 6) -> onnx.ModelProto:
    """`layers` decode layers' weight matmuls (LAYER_SHAPES) with fp32 weights, M = `rows`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = LAYER_SHAPES * layers
    weights = [
        numpy_helper.from_array((rng.standard_normal(s) * 0.02).astype(np.float32), f"w{i}")
        for i, s in enumerate(shapes)
    ]
    nodes = [helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]) for i, (k, _) in enumerate(shapes)]
    inputs = [
        helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, rows, k]) for k in sorted({k for k, _ in shapes})
    ]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(shapes))]
    graph = helper.make_graph(nodes, "decode_matmuls", inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def layer_feeds(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {f"x{k}": rng.standard_normal((1, rows, k)).astype(np.float32) for k in sorted({k for k, _ in LAYER_SHAPES})}


def accuracy_levels(rows: int) -> None:
    sessions = {level: session(as_matmul_nbits(decode_matmuls(rows), 4, 128, False, level)) for level in range(5)}
    feeds = layer_feeds(rows)
    calls = max(1, 20 // rows)
    times: dict[int, list[float]] = {level: [] for level in sessions}
    for _ in range(5):
        for level, sess in sessions.items():
            times[level].append(mean_ms(lambda sess=sess: sess.run(None, feeds), calls))
    for level, values in times.items():
        print(f"accuracy_level {level}, M = {rows}: median {np.median(values):.2f} ms over 5 rounds")


# --------------------------------------------------------------------------- weight-only 8-bit


WEIGHT_FORMS = {  # name: (bits, block size, accuracy level), symmetric weights; None: fp32 MatMul
    "fp32 MatMul": None,
    "8-bit block 32, fp32 compute (level 0)": (8, 32, 0),
    "8-bit block 128, fp32 compute (level 0)": (8, 128, 0),
    "8-bit block 32, fp32 compute (level 1)": (8, 32, 1),
    "8-bit block 128, int8 compute (level 4: lumen-int8-nbits)": (8, 128, 4),
    "4-bit block 128, int8 compute (level 4)": (4, 128, 4),
}


def weight_only_8bit(layers: int = 6, rounds: int = 5) -> dict[str, tuple[float, float]]:
    """Each WEIGHT_FORMS form of `layers` layers' decode matmuls at M = 1, in turns.

    Levels 0 and 1 keep the activations in fp32 (weight-only quantization, the candidate for a
    class between fp32 and int8); level 4 quantizes them to int8 per block, as our int8 and q4
    decoders do. Returns {form: (median ms, relative error of all outputs against fp32)}.
    """
    sessions = {
        name: session(
            decode_matmuls(1, layers).SerializeToString()
            if form is None
            else as_matmul_nbits(decode_matmuls(1, layers), form[0], form[1], True, form[2])
        )
        for name, form in WEIGHT_FORMS.items()
    }
    feeds = layer_feeds(1)
    reference = np.concatenate([y.ravel() for y in sessions["fp32 MatMul"].run(None, feeds)])
    errors = {}
    for name, sess in sessions.items():
        got = np.concatenate([y.ravel() for y in sess.run(None, feeds)])
        errors[name] = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            times[name].append(mean_ms(lambda sess=sess: sess.run(None, feeds), 5))
    results = {name: (float(np.median(times[name])), errors[name]) for name in sessions}
    fp32_ms = results["fp32 MatMul"][0]
    for name, (ms, error) in results.items():
        print(f"{name}: median {ms:.2f} ms over {rounds} rounds ({ms / fp32_ms:.2f}x fp32), relative error {error:.1e}")
    return results


# --------------------------------------------------------------------------- vision arena


def vision_arena(graph: Path, model_dir: Path) -> None:
    sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parents[1])]
    from lumen_vlm.backends.onnxrt_backend import default_session_options
    from lumen_vlm.backends.ort_runtime import copy_options
    from lumen_vlm.graphs.cache import OptimizedGraphCache
    from tools.quantize_vision import bundled_photo, encode, model_image_spec, pixels_for

    pixels = pixels_for([bundled_photo("chelsea.png")], model_image_spec(model_dir))["chelsea.png"]
    cache = OptimizedGraphCache(Path(tempfile.mkdtemp(prefix="vision-arena-")))
    providers = ["CPUExecutionProvider"]
    sessions = {}
    for arena in (True, False):
        options = copy_options(default_session_options(THREADS), enable_cpu_mem_arena=arena)
        sessions[f"direct, arena {'on' if arena else 'off'}"] = ort.InferenceSession(
            str(graph), options, providers=providers
        )
        sessions[f"saved optimized, arena {'on' if arena else 'off'}"] = cache.open(graph, options, providers)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(6):
        for name, sess in sessions.items():
            times[name].append(encode(sess, pixels)[1])
    for name, values in times.items():
        print(f"{graph.name}, {name}: median {np.median(values):.0f} ms, min {min(values):.0f} ms over 6 rounds")


# --------------------------------------------------------------------------- prefill graphs

PREFILL_PROMPT_TOKENS = 292
RUN_ROWS = (1, 2, 4, 8, 16, 32)


def prefill_graphs(model_dir: Path, rounds: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, PreparedRequest

    def load(precision: str, prefill: str | None = None) -> FastVLMModelManager:
        return FastVLMModelManager.from_model_dir(
            model_dir,
            precision=precision,
            prefill_precision=prefill,
            intra_op_threads=THREADS,
            optimized_graph_dir=model_dir.parent / "ort-optimized",
        )

    managers = {"q4": load("q4"), "int8": load("int8"), "q4 with int8 prompts": load("q4", "int8")}
    backends = {name: managers[name].backend for name in ("q4", "int8")}
    runs: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
    for _ in range(3):
        for rows in RUN_ROWS:
            for name, backend in backends.items():
                cache = backend.new_kv_cache(1, 512)
                backend.forward(cache, [0], backend.embed(np.arange(270))[None])
                embeds = backend.embed(np.arange(rows))[None]
                started = time.perf_counter()
                backend.forward(cache, [0], embeds)
                runs[(rows, name)].append((time.perf_counter() - started) * 1000)
    for rows in RUN_ROWS:
        medians = ", ".join(f"{name} {np.median(runs[(rows, name)]):.1f} ms" for name in backends)
        print(f"a run of {rows:2d} tokens after 270 (median of 3): {medians}")
    vocab = managers["q4"].spec.decoder.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, PREFILL_PROMPT_TOKENS)
    times: dict[str, list[float]] = collections.defaultdict(list)
    order = list(managers)
    for round_index in range(rounds):
        for name in order[round_index % 3 :] + order[: round_index % 3]:
            manager = managers[name]
            cache = manager.new_kv_cache(1, PREFILL_PROMPT_TOKENS + 1)
            prepared = PreparedRequest(prompt, None, 1, time.perf_counter())
            started = time.perf_counter()
            for _ in manager.prefill(prepared, cache, 0, PREFILL_PROMPT_TOKENS):
                pass
            times[name].append((time.perf_counter() - started) * 1000)
    both = times["q4 with int8 prompts"]
    for name, values in times.items():
        print(f"{PREFILL_PROMPT_TOKENS}-token prefill, {name}: median {np.median(values):.0f} ms over {rounds} rounds")
    for name in ("q4", "int8"):
        ratios = [a / b for a, b in zip(both, times[name], strict=True)]
        print(f"q4 with int8 prompts / {name}: median per-round ratio {np.median(ratios):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "check",
        choices=(
            "profile",
            "fp16",
            "lm-head",
            "accuracy-levels",
            "weight-only-8bit",
            "vision-arena",
            "prefill-graphs",
        ),
    )
    parser.add_argument("graph", type=Path, nargs="?", help="profile: the decoder graph; vision-arena: a vision graph")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="vision-arena: the model (default: the graph's onnx/ parent); prefill-graphs: the model "
        "(default: the benchmark's)",
    )
    parser.add_argument("--rounds", type=int, default=12, help="prefill-graphs: rounds of the three prefills")
    parser.add_argument("--depth", type=int, default=292)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=1, help="accuracy-levels: the matmuls' M (292: a prefill)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rounds < 1:
        parser.error("--rows and --rounds must be at least 1")
    print(f"onnxruntime {ort.__version__}, {THREADS} threads, {os.cpu_count()} logical cores")
    if args.check == "profile":
        if args.graph is None:
            parser.error("profile needs the decoder graph")
        profile(args.graph, args.depth, args.steps)
    elif args.check == "fp16":
        fp16()
    elif args.check == "lm-head":
        lm_head()
    elif args.check == "accuracy-levels":
        accuracy_levels(args.rows)
    elif args.check == "weight-only-8bit":
        weight_only_8bit()
    elif args.check == "prefill-graphs":
        prefill_graphs((args.model_dir or BENCH_MODEL).expanduser(), args.rounds)
    else:
        if args.graph is None:
            parser.error("vision-arena needs a vision graph")
        vision_arena(args.graph, args.model_dir or args.graph.resolve().parent.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
