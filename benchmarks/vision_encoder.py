"""What ONNX Runtime's options do to FastVLM's vision encoder (FastViTHD): speed and features.

    python benchmarks/vision_encoder.py [--model-dir DIR] [--work DIR] [--runs 5] [--threads 2]
                                        [--small-size 512] [--json FILE] [--no-memory]
                                        [--only RECIPE ...]

Every variant is measured against the model's own fp32 graph (onnx/vision_encoder.onnx):

* fp32 at ORT_ENABLE_ALL, the baseline (what the server runs), and at ORT_ENABLE_EXTENDED
  (the same without ALL's layout optimizations: NCHWc convolutions);
* int8 dynamic quantization (`quantize_dynamic`, QInt8 weights; ConvInteger/MatMulInteger);
* int8 static quantization in QDQ format (`quantize_static`, per-channel weights, uint8
  activations), calibrated on real photographs: with int8 weights (U8S8, ORT's x86 choice),
  the same with `reduce_range`, with uint8 weights (U8U8), U8S8 on the dense (group 1)
  convolutions only (with 8-bit weights; the same graph unfused at ORT_DISABLE_ALL, which
  computes its arithmetic without the int8 kernels; and with the tool's 7-bit weights), see
  `make_static`, and tools/quantize_vision.py's graph: the dense ones less those its
  sensitivity search leaves in fp32 (`make_searched`);
* fp32 at a smaller input (`--small-size`, 512 px: 64 image tokens instead of 256), a choice
  a user would make. Its features are not comparable with the model's, so it gets speed only.
  The model's graph has its input size baked in, so that graph is re-exported from the model's
  PyTorch weights (MODEL_DIR/torch, which tools/make_test_model.py --save-torch writes; else
  from config.json with random weights, which is enough for speed). That needs the `[tools]`
  extra (torch, transformers, timm, onnxscript).

Pixels are made by the server's own preprocessing (`lumen_vlm.fastvlm.image.image_to_pixels`
with the model's `preprocessor_config.json`), from image bytes, as a request's are.

Photographs: the ones scikit-image ships inside its wheel (no download), read as files, so
the `[bench]` extra (or `pip install scikit-image`) is needed. Calibration and evaluation use different photos.

Timing: each round runs every variant once on the same photo, the order rotating per round,
so that noise from other processes hits all variants alike; the table gives medians and
ratios to fp32 within this run (absolute times on a shared machine mean little). Accuracy:
features of each evaluation photo against fp32's (cosine of the flattened features, the
lowest per-token cosine, max abs error, relative error ||q - f|| / ||f||). A variant is kept
only if its cosine is >= 0.99 on every evaluation photo. Memory: peak and steady RSS of a
fresh process that loads the variant and encodes once, over that process's RSS before.

Quantized and re-exported graphs are written only under --work (default: beside the model
directory, or under the system temp directory for a model inside this repository), reused
while the fp32 graph and the recipe are unchanged.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # the package, and tools/

from run_benchmark import machine_description, memory_read_bandwidth  # noqa: E402  (the sibling script)

from lumen_vlm.resources.model_spec import ImageSpec  # noqa: E402
from tools.quantize_vision import (  # noqa: E402  (the recipe, its photos and its measures are the tool's)
    CALIBRATION_PHOTOS,
    HELD_OUT_PHOTOS,
    KEEP_COSINE,
    REDUCE_RANGE,
    SEARCH_RUNS,
    SELECT_COSINE,
    Search,
    bundled_photo,
    compare,
    dense_convs,
    encode,
    make_session,
    model_image_spec,
    preprocess,
    quantize_qdq,
)
from tools.quantize_vision import pixels_for as photo_pixels  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "lumen-vlm" / "bench" / "fastvlm-0.5b-random"
EVALUATION_PHOTOS = HELD_OUT_PHOTOS  # the tool's verdict photos; calibration never sees them
ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
EXTENDED = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
UNFUSED = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # QDQ graphs as their arithmetic: no int8 kernel


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One way to run the encoder: a graph (by recipe) and session options."""

    name: str
    graph: str  # a key of GRAPH_RECIPES
    level: ort.GraphOptimizationLevel = ALL
    small: bool = False  # at --small-size: speed and tokens only

    @property
    def comparable(self) -> bool:
        return not self.small


VARIANTS = (
    Variant("fp32, ORT_ENABLE_ALL (baseline)", "fp32"),
    Variant("fp32, ORT_ENABLE_EXTENDED (no NCHWc)", "fp32", level=EXTENDED),
    Variant("int8 dynamic (QInt8 weights)", "int8-dynamic"),
    Variant("int8 static QDQ, per-channel, U8S8", "int8-static-u8s8"),
    Variant("int8 static QDQ, per-channel, U8S8 reduce_range", "int8-static-u8s8-reduce-range"),
    Variant("int8 static QDQ, per-channel, U8U8", "int8-static-u8u8"),
    Variant("int8 static QDQ, per-channel, U8S8, dense convolutions only", "int8-static-dense-convs"),
    # The same graph's arithmetic without ORT's int8 kernels: on a CPU without VNNI, what the
    # kernels lose to int16 saturation is the difference from the line above.
    Variant(
        "the same, unfused (ORT_DISABLE_ALL: dequantize, fp32 convolution, quantize)",
        "int8-static-dense-convs",
        level=UNFUSED,
    ),
    Variant(
        "int8 static QDQ, per-channel, U8S8, dense convolutions only, 7-bit weights (the tool's recipe, no search)",
        "int8-static-dense-convs-reduce-range",
    ),
    Variant("int8 static QDQ, dense convolutions, sensitivity search (tools/quantize_vision.py)", "int8-tool"),
    Variant("fp32, ORT_ENABLE_ALL, small input", "fp32-small", small=True),
)
BASELINE = VARIANTS[0]


@dataclass
class Outcome:
    """What was measured for one variant; `error` holds why it could not be."""

    variant: str
    graph: str
    level: str
    input_size: int
    tokens: int | None = None
    graph_mb: float | None = None
    times_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    ratio_to_fp32: float | None = None
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # photo -> metrics
    kept: bool | None = None  # None: not comparable (speed only) or failed
    memory_mb: dict[str, float] = field(default_factory=dict)
    error: str | None = None


# --------------------------------------------------------------------------- photos and pixels


def pixels_for(photos: Sequence[str], spec: ImageSpec) -> dict[str, np.ndarray]:
    """Each of scikit-image's photos, by name, through the server's preprocessing."""
    return photo_pixels([bundled_photo(name) for name in photos], spec)


# --------------------------------------------------------------------------- graphs


@dataclass(frozen=True)
class Inputs:
    """What the graph recipes start from."""

    model_dir: Path
    fp32: Path
    work: Path
    calibration: dict[str, np.ndarray]  # photo -> pixels
    small_size: int
    threads: int


def make_dynamic(inputs: Inputs, out: Path) -> None:
    quantize_dynamic(str(inputs.fp32), str(out), weight_type=QuantType.QInt8)


def preprocessed_fp32(inputs: Inputs) -> Path:
    """ORT's recommended pre-processing for static quantization (shape inference and basic
    optimizations), once for both static recipes."""
    return preprocess(inputs.fp32, inputs.work / f"fp32-preprocessed.{source_stamp(inputs)[:16]}.onnx")


def make_static(
    inputs: Inputs, out: Path, weights: QuantType, reduce_range: bool = False, dense_convs_only: bool = False
) -> None:
    """QDQ, per-channel weights of type `weights`, uint8 activations, MinMax ranges from the
    calibration photos, every op ORT can quantize. The ranges (floats, whatever the types) are
    cached, so that only the first static recipe calibrates.

    U8S8 is ORT's recommendation for x86; on AVX2 without VNNI its kernels (VPMADDUBSW) add
    pairs of u8 x s8 products into int16, which can saturate. ORT's documented remedies are
    `reduce_range` (7-bit weights) and U8U8, so both are measured too.

    `dense_convs_only` quantizes the convolutions with group 1 and nothing else: FastViTHD's
    depthwise convolutions (half of its 186) and its attention MatMuls stay fp32. Measured
    while choosing the recipes: the MatMuls alone in int8 changed the features little
    (cosine >= 0.997) and saved no time; the depthwise ones cost most of the accuracy.
    """
    graph = preprocessed_fp32(inputs)
    nodes = dense_convs(graph) if dense_convs_only else None
    quantize_qdq(graph, out, list(inputs.calibration.values()), calibration_cache(inputs), weights, reduce_range, nodes)


def make_searched(inputs: Inputs, out: Path) -> None:
    """tools/quantize_vision.py's graph: dense convolutions, some left in fp32 by its search on
    the calibration photos (the evaluation photos here are its held-out ones)."""
    # The same photos' ranges as the other static recipes': computed once for all of them.
    ranges = calibration_cache(inputs)
    search = Search(preprocessed_fp32(inputs), inputs.work, inputs.calibration, inputs.threads, ranges)
    left_out = search.choose()
    progress(f"the search left {len(left_out)} of {len(search.dense)} dense convolutions in fp32")
    search.build(left_out, out)


def calibration_cache(inputs: Inputs) -> Path:
    """The calibration ranges' file, named by what they depend on, so stale ones are never read."""
    return inputs.work / f"calibration-ranges.{source_stamp(inputs, *CALIBRATION_PHOTOS)[:16]}.json"


def make_small(inputs: Inputs, out: Path) -> None:
    """Re-export the encoder at --small-size in a child process (torch stays out of this one)."""
    with child_process() as pool:
        pool.submit(export_vision_graph, str(inputs.model_dir), inputs.small_size, str(out)).result()


def make_fp32(inputs: Inputs, out: Path) -> None:
    raise AssertionError("the fp32 graph is the model's own")


GRAPH_RECIPES: dict[str, Callable[[Inputs, Path], None]] = {
    "fp32": make_fp32,
    "int8-dynamic": make_dynamic,
    "int8-static-u8s8": lambda inputs, out: make_static(inputs, out, QuantType.QInt8),
    "int8-static-u8s8-reduce-range": lambda inputs, out: make_static(inputs, out, QuantType.QInt8, reduce_range=True),
    "int8-static-u8u8": lambda inputs, out: make_static(inputs, out, QuantType.QUInt8),
    "int8-static-dense-convs": lambda inputs, out: make_static(inputs, out, QuantType.QInt8, dense_convs_only=True),
    "int8-static-dense-convs-reduce-range": lambda inputs, out: make_static(
        inputs, out, QuantType.QInt8, reduce_range=True, dense_convs_only=True
    ),
    "int8-tool": make_searched,
    "fp32-small": make_small,
}


def source_stamp(inputs: Inputs, *parts: str) -> str:
    """A hash of what a made file depends on: the fp32 graph, ORT's version, and `parts`."""
    stat = inputs.fp32.stat()
    stamp = [str(inputs.fp32.resolve()), str(stat.st_size), str(stat.st_mtime_ns), ort.__version__, *parts]
    return hashlib.sha256("\n".join(stamp).encode()).hexdigest()


def recipe_stamp(inputs: Inputs, recipe: str) -> str:
    if recipe.startswith("int8-static"):
        return source_stamp(inputs, recipe, *CALIBRATION_PHOTOS)
    if recipe == "int8-tool":
        return source_stamp(
            inputs, recipe, *CALIBRATION_PHOTOS, str(SELECT_COSINE), str(SEARCH_RUNS), str(REDUCE_RANGE)
        )
    if recipe == "fp32-small":
        return source_stamp(inputs, recipe, str(inputs.small_size))
    return source_stamp(inputs, recipe)


def ensure_graph(inputs: Inputs, recipe: str) -> Path:
    """The graph `recipe` makes, made once per stamp; the model's own for fp32."""
    if recipe == "fp32":
        return inputs.fp32
    out = inputs.work / f"vision_encoder.{recipe}.onnx"
    stamp_file = out.with_suffix(".stamp")
    stamp = recipe_stamp(inputs, recipe)
    if out.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return out
    progress(f"making {out.name}")
    started = time.perf_counter()
    GRAPH_RECIPES[recipe](inputs, out)
    stamp_file.write_text(stamp)
    progress(f"made {out.name} in {time.perf_counter() - started:.0f} s")
    return out


def export_vision_graph(model_dir: str, size: int, out: str) -> None:
    """(Child process) FastVLM's image features at `size` px, exported by make_test_model's own
    export of the vision encoder."""
    # CPU torch + timm, with its torchvision shim
    from tools.make_test_model import export_vision_encoder, import_reference_stack

    import_reference_stack()
    import torch
    from transformers import AutoConfig, FastVlmForConditionalGeneration

    weights = Path(model_dir) / "torch"
    if weights.is_dir():
        model = FastVlmForConditionalGeneration.from_pretrained(str(weights))
    else:  # the speed of a graph does not depend on its weights' values
        model = FastVlmForConditionalGeneration(AutoConfig.from_pretrained(model_dir))
    with torch.no_grad():
        export_vision_encoder(model.eval(), size, Path(out))


# --------------------------------------------------------------------------- sessions and measuring


def rss_mb(field_name: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(graph: str, level: int, size: int, threads: int) -> dict[str, float]:
    """(Child process) RSS a variant costs: loaded and run once, over the RSS before loading."""
    before = rss_mb("VmRSS")
    session = make_session(Path(graph), threads, ort.GraphOptimizationLevel(level))
    encode(session, np.zeros((1, 3, size, size), dtype=np.float32))
    return {"steady_rss_mb": rss_mb("VmRSS") - before, "peak_rss_mb": rss_mb("VmHWM") - before}


def child_process() -> concurrent.futures.ProcessPoolExecutor:
    """A fresh process, so that memory and imports of one job never leak into another's."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def rounds(names: list[str], runs: int) -> Iterator[list[str]]:
    """`runs` orders of the variants, rotated by one each round, so none always runs first."""
    for r in range(runs):
        shift = r % len(names)
        yield names[shift:] + names[:shift]


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Setup:
    """The loaded variants and the pixels they are measured on."""

    sessions: dict[str, ort.InferenceSession]
    outcomes: dict[str, Outcome]
    pixels: dict[str, np.ndarray]  # evaluation photo -> model-size pixels
    small_pixels: dict[str, np.ndarray]


def prepare(args: argparse.Namespace, variants: Sequence[Variant], spec: ImageSpec) -> tuple[Setup, dict[str, Path]]:
    """Make every graph, open a session per variant; a variant that fails is kept with its error."""
    fp32 = args.model_dir / "onnx" / "vision_encoder.onnx"
    calibration = pixels_for(CALIBRATION_PHOTOS, spec)
    inputs = Inputs(args.model_dir, fp32, args.work, calibration, args.small_size, args.threads)
    # --small-size 0 skips the small input: no pixels are made for it.
    small = pixels_for(EVALUATION_PHOTOS[:1], replace(spec, size=args.small_size)) if args.small_size else {}
    setup = Setup({}, {}, pixels_for(EVALUATION_PHOTOS, spec), small)
    graphs: dict[str, Path] = {}
    for variant in variants:
        size = args.small_size if variant.small else spec.size
        outcome = Outcome(variant.name, variant.graph, variant.level.name, size)
        setup.outcomes[variant.name] = outcome
        try:
            graph = graphs.get(variant.graph) or ensure_graph(inputs, variant.graph)
            graphs[variant.graph] = graph
            outcome.graph_mb = graph_megabytes(graph)
            setup.sessions[variant.name] = make_session(graph, args.threads, variant.level)
        except Exception as exc:  # reported in the table, the other variants still run
            outcome.error = f"{type(exc).__name__}: {exc}"
            progress(f"{variant.name}: {outcome.error}")
    return setup, graphs


def graph_megabytes(graph: Path) -> float:
    """The graph's size on disk, with any external-data files beside it."""
    extra = sum(p.stat().st_size for p in graph.parent.glob(graph.name + "*.data")) + sum(
        p.stat().st_size for p in graph.parent.glob(graph.name + "_data")
    )
    return (graph.stat().st_size + extra) / 1e6


def measure_accuracy(setup: Setup, variants: Sequence[Variant]) -> None:
    """Each comparable variant on every evaluation photo against fp32 (this also warms them up)."""
    base = setup.sessions[BASELINE.name]
    for photo, pixels in setup.pixels.items():
        reference, _ = encode(base, pixels)
        setup.outcomes[BASELINE.name].tokens = int(reference.shape[0])
        for variant in variants:
            if variant.name not in setup.sessions or not variant.comparable:
                continue
            features, _ = encode(setup.sessions[variant.name], pixels)
            outcome = setup.outcomes[variant.name]
            outcome.tokens = int(features.shape[0])
            outcome.accuracy[photo] = compare(reference, features)
        progress(f"accuracy: {photo} done")
    for variant in variants:
        outcome = setup.outcomes[variant.name]
        if variant.comparable and outcome.accuracy:
            outcome.kept = all(m["cosine"] >= KEEP_COSINE for m in outcome.accuracy.values())


def measure_speed(setup: Setup, variants: Sequence[Variant], runs: int) -> None:
    """Interleaved rounds on one photo; medians, and ratios to fp32 from the same rounds."""
    photo = EVALUATION_PHOTOS[0]
    names = [v.name for v in variants if v.name in setup.sessions]
    small = {v.name for v in variants if v.small}
    for name in small & set(names):  # warm-up: the comparable ones ran in measure_accuracy
        features, _ = encode(setup.sessions[name], setup.small_pixels[photo])
        setup.outcomes[name].tokens = int(features.shape[0])
    for r, order in enumerate(rounds(names, runs), 1):
        for name in order:
            pixels = setup.small_pixels[photo] if name in small else setup.pixels[photo]
            setup.outcomes[name].times_ms.append(encode(setup.sessions[name], pixels)[1])
        progress(f"round {r}/{runs} done")
    base = setup.outcomes[BASELINE.name]
    for name in names:
        outcome = setup.outcomes[name]
        outcome.median_ms = statistics.median(outcome.times_ms)
        if base.times_ms:
            outcome.ratio_to_fp32 = outcome.median_ms / statistics.median(base.times_ms)


def measure_memories(setup: Setup, variants: Sequence[Variant], graphs: dict[str, Path], threads: int) -> None:
    """Each variant's RSS in a fresh process of its own (sequential: they would compete)."""
    for variant in variants:
        outcome = setup.outcomes[variant.name]
        if variant.graph not in graphs or outcome.error:
            continue
        with child_process() as pool:
            graph, level = str(graphs[variant.graph]), int(variant.level)
            job = pool.submit(measure_memory, graph, level, outcome.input_size, threads)
            try:
                outcome.memory_mb = job.result()
            except Exception as exc:
                outcome.memory_mb = {"error": f"{type(exc).__name__}: {exc}"}  # type: ignore[dict-item]


# --------------------------------------------------------------------------- report


def mlas_int8_flags() -> list[str]:
    """The CPU flags that decide MLAS's int8 kernels: VNNI avoids AVX2's u8s8 saturation."""
    from tools.quantize_model import cpu_flags

    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or "vnni" in f)


def machine(threads: int, runs: int) -> dict[str, Any]:
    """run_benchmark's description of the machine, its memory read bandwidth before the run,
    and this run's settings."""
    return {
        **machine_description(),
        "cpu_flags": mlas_int8_flags(),
        "memory_read_gb_s": memory_read_bandwidth() / 1e9,
        "threads": threads,
        "runs": runs,
    }


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def worst(outcome: Outcome, metric: str, lowest: bool) -> float | None:
    values = [m[metric] for m in outcome.accuracy.values()]
    return (min(values) if lowest else max(values)) if values else None


def kept_text(outcome: Outcome) -> str:
    if outcome.error:
        return "failed"
    if outcome.kept is None:
        return "speed only"
    return "yes" if outcome.kept else "**no**"


def summary_table(outcomes: Sequence[Outcome]) -> list[str]:
    lines = [
        "| Variant | Input | Tokens | Graph MB | RSS MB (peak) | Median ms | vs fp32 | Cosine (min) "
        "| Min token cos | Max abs err | Rel err (max) | Kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        memory = o.memory_mb
        rss = (
            f"{memory['steady_rss_mb']:.0f} ({memory['peak_rss_mb']:.0f})"
            if isinstance(memory.get("steady_rss_mb"), float)
            else "—"
        )
        lines.append(
            f"| {o.variant} | {o.input_size} | {o.tokens or '—'} | {fmt(o.graph_mb, '.0f')} | {rss} "
            f"| {fmt(o.median_ms, '.0f')} | {fmt(o.ratio_to_fp32, '.2f')} | {fmt(worst(o, 'cosine', True), '.5f')} "
            f"| {fmt(worst(o, 'min_token_cosine', True), '.4f')} | {fmt(worst(o, 'max_abs_error', False), '.3g')} "
            f"| {fmt(worst(o, 'relative_error', False), '.3g')} | {kept_text(o)} |"
        )
    return lines


def photo_table(outcomes: Sequence[Outcome]) -> list[str]:
    compared = [o for o in outcomes if o.accuracy and o.variant != BASELINE.name]
    if not compared:
        return []
    lines = [
        "| Variant | " + " | ".join(EVALUATION_PHOTOS) + " |",
        "|---|" + "---|" * len(EVALUATION_PHOTOS),
    ]
    for o in compared:
        cells = [
            f"{o.accuracy[p]['cosine']:.5f} / {o.accuracy[p]['min_token_cosine']:.4f}" if p in o.accuracy else "—"
            for p in EVALUATION_PHOTOS
        ]
        lines.append(f"| {o.variant} | " + " | ".join(cells) + " |")
    return lines


def report(info: dict[str, Any], outcomes: Sequence[Outcome]) -> str:
    head = [
        f"CPU: {info['cpu']} ({info['logical_cores']} logical cores; {', '.join(info['cpu_flags']) or 'no AVX'}); "
        f"memory read {info['memory_read_gb_s']:.1f} GB/s before the run; "
        f"onnxruntime {info['onnxruntime']}; {info['threads']} intra-op threads for every variant.",
        f"Model: {info['model_dir']}; vision graph input {info['image_size']} px.",
        f"Encode time: median of {info['runs']} interleaved rounds on {EVALUATION_PHOTOS[0]}, "
        "pixels prepared beforehand (preprocessing not included); 'vs fp32' is the ratio to the baseline's "
        "median in the same rounds.",
        f"Accuracy vs fp32 features on {', '.join(EVALUATION_PHOTOS)} (calibration used "
        f"{', '.join(CALIBRATION_PHOTOS)}); worst photo shown. Kept: cosine >= {KEEP_COSINE} on every photo.",
        "RSS: growth of a fresh process loading the variant and encoding once: steady (peak).",
        "",
    ]
    body = [*summary_table(outcomes), ""]
    photos = photo_table(outcomes)
    if photos:
        body += ["Per photo, cosine / min per-token cosine:", "", *photos, ""]
    errors = [f"- {o.variant}: {o.error}" for o in outcomes if o.error]
    if errors:
        body += ["Failed:", *errors, ""]
    return "\n".join(head + body)


def progress(message: str) -> None:
    print(f"[vision_encoder] {message}", file=sys.stderr, flush=True)


def default_work(model_dir: Path) -> Path:
    """Beside the model (outside the repository); the temp directory for a model inside it."""
    work = model_dir.resolve().parent / "vision-encoder-bench" / model_dir.name
    if work.is_relative_to(ROOT):
        work = Path(tempfile.gettempdir()) / "lumen-vlm-vision-encoder-bench" / model_dir.name
    return work


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--work", type=Path, help="where made graphs go (never inside the repository)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (every variant once per round)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, the same for every variant")
    parser.add_argument("--small-size", type=int, default=512, help="the smaller input to time; 0 skips it")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant RSS processes")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(GRAPH_RECIPES), help="measure these graphs' variants (fp32's always)"
    )
    args = parser.parse_args(argv)
    args.model_dir = args.model_dir.expanduser()
    args.work = (args.work.expanduser() if args.work else default_work(args.model_dir)).resolve()
    if args.work.is_relative_to(ROOT):
        parser.error(f"--work {args.work} is inside the repository; made graphs must go elsewhere")
    return args


def chosen(variant: Variant, only: Sequence[str] | None) -> bool:
    """Whether --only asks for `variant`; the baseline is always measured, as every ratio's base."""
    return only is None or variant == BASELINE or variant.graph in only


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    spec = model_image_spec(args.model_dir)
    info = {**machine(args.threads, args.runs), "model_dir": str(args.model_dir), "image_size": spec.size}
    variants = [v for v in VARIANTS if (args.small_size or not v.small) and chosen(v, args.only)]
    setup, graphs = prepare(args, variants, spec)
    if BASELINE.name not in setup.sessions:
        raise SystemExit(f"the fp32 graph does not load: {setup.outcomes[BASELINE.name].error}")
    progress("accuracy pass (and warm-up)")
    measure_accuracy(setup, variants)
    progress(f"{args.runs} timed rounds")
    measure_speed(setup, variants, args.runs)
    setup.sessions.clear()  # free them before the memory processes start
    if not args.no_memory:
        progress("memory, one fresh process per variant")
        measure_memories(setup, variants, graphs, args.threads)
    outcomes = [setup.outcomes[v.name] for v in variants]
    print(report(info, outcomes))
    if args.json:
        payload = {
            "machine": info,
            "keep_rule": f"cosine >= {KEEP_COSINE} on every evaluation photo",
            "calibration_photos": CALIBRATION_PHOTOS,
            "evaluation_photos": EVALUATION_PHOTOS,
            "work_dir": str(args.work),
            "variants": [asdict(o) for o in outcomes],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
