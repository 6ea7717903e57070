"""Write an int8 vision encoder whose image features stay within the accuracy rule of fp32's.

    python tools/quantize_vision.py MODEL_DIR [--photos F ...] [--held-out F ...] [--threads 2]

Writes the vision graph in precision int8 (onnx-community: ``onnx/vision_encoder_int8.onnx``;
Lumen layout: ``onnx/vision.int8.onnx``) and a report beside it (``...int8.json``). The server
uses it where the vision graph's precision is int8: ``vision_precision: int8`` in the
service's options (any decoder precision), or ``precision: int8`` with no ``vision_precision``.

The recipe (benchmarks/vision_encoder.py measures it against the alternatives): static
quantization in QDQ form, int8 weights per output channel and uint8 activations (U8S8, ONNX
Runtime's choice for x86), the weights in 7 bits (`REDUCE_RANGE`), MinMax ranges from
calibration photographs sent through the server's own preprocessing, on FastViTHD's dense
(group 1) convolutions only. The depthwise convolutions and the attention MatMuls stay fp32:
the depthwise ones cost most of the accuracy, the MatMuls saved no time.

Quantizing every dense convolution is not always accurate enough (on the random-weight 0.5B model
one unseen photo fell to cosine 0.987-0.988 on two CPUs), so a sensitivity search leaves some in fp32:

1. the dense convolutions, in graph order, are cut into `SEARCH_RUNS` runs of neighbours;
2. each run is tried left in fp32 alone, on the calibration photos, and
3. the runs whose fp32 helped most are left in fp32, one more at a time, until every calibration
   photo's features reach `SELECT_COSINE` of fp32's.

The graph is then kept only if every held-out photo (which neither calibration nor the search saw)
reaches `KEEP_COSINE`; otherwise nothing is written and the exit status is 1. So the rule is
checked on the weights being quantized, not on the ones the recipe was chosen with.

Photographs: by default those scikit-image ships inside its wheel (``pip install scikit-image``;
no download); ``--photos`` and ``--held-out`` take any image files instead. Only onnxruntime and
onnx are needed, no torch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from lumen_vlm.backends.onnxrt_backend import default_session_options
from lumen_vlm.fastvlm.image import image_to_pixels
from lumen_vlm.resources.model_files import (
    graph_candidates,
    load_tokenizer,
    locate_model_files,
    read_file_spec,
    remove_graph,
)
from lumen_vlm.resources.model_spec import ImageSpec

log = logging.getLogger("quantize_vision")

# Colour (and one grey) photographs bundled in scikit-image's wheel; the two sets share none.
CALIBRATION_PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png", "hubble_deep_field.jpg", "camera.png")
HELD_OUT_PHOTOS = ("chelsea.png", "rocket.jpg", "retina.jpg", "ihc.png")
KEEP_COSINE = 0.99  # the accuracy rule: features cosine with fp32's, on every held-out photo
# The search's target on the calibration photos. They set the ranges, so they fare better than
# unseen ones: on the random-weight 0.5B model the worst unseen photo ran 0.003-0.004 below the
# worst calibration photo, in every recipe tried. The margin is that gap, and a little more.
SELECT_COSINE = 0.995
# Runs of neighbouring dense convolutions the search leaves in fp32 or not. On the random-weight
# 0.5B model's 96, 16 runs of 6 left 24 in fp32 where 8 runs of 12 left 36, under the same rule
# (0.65x fp32's encode against 0.71x), in 21 trials against 12 (8-bit weights, AVX-512 VNNI).
SEARCH_RUNS = 16
# Weights in 7 bits ([-64, 64]), so that no x86 CPU's int8 kernel saturates and the verdict holds
# on every CPU, not only the one that ran the tool. Without AVX-512 VNNI or AVX-VNNI, ONNX
# Runtime's U8S8 kernels add pairs of u8 x s8 products in int16 (vpmaddubsw): 2 x 255 x 127
# overflows it, 2 x 255 x 64 does not. On an AVX2-only AMD EPYC, one graph's unseen-photo cosine
# was 0.928 against 0.988 for the same graph's unfused arithmetic; 7-bit weights gave 0.987 there,
# at the same speed.
REDUCE_RANGE = True


# --------------------------------------------------------------------------- photos and features


def bundled_photo(name: str) -> Path:
    """A photo file from scikit-image's wheel."""
    try:
        import skimage.data
    except ImportError as exc:
        raise SystemExit(
            "the default photographs come from scikit-image: pip install scikit-image, or pass --photos and --held-out"
        ) from exc
    path = Path(skimage.data.data_dir) / name
    if not path.is_file():
        raise SystemExit(f"{path} is not in this scikit-image wheel; pass --photos and --held-out")
    return path


def model_image_spec(model_dir: Path) -> ImageSpec:
    """The image preprocessing the server uses for this model, as its files state it."""
    files = locate_model_files(model_dir)
    spec = read_file_spec(files, load_tokenizer(files.tokenizer).token_to_id).image
    if spec.size == 0:  # no file states it: the server takes the vision graph's input size
        spec = replace(spec, size=graph_input_size(files.graphs["vision"]))
    return spec


def graph_input_size(path: Path) -> int:
    """The square side a vision graph's pixel_values input declares."""
    shape = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    return int(shape[-1])


def pixels_for(photos: Sequence[Path], spec: ImageSpec) -> dict[str, np.ndarray]:
    """Each photo's pixels, made from its file's bytes by the server's preprocessing."""
    return {photo.name: image_to_pixels(photo.read_bytes(), spec) for photo in photos}


def make_session(graph: Path, threads: int, level: ort.GraphOptimizationLevel | None = None) -> ort.InferenceSession:
    """A session with the server's options (default_session_options) at `threads` threads."""
    options = default_session_options(threads)
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def encode(session: ort.InferenceSession, pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """(features [tokens, hidden], milliseconds) of one encode, as the backend's encode_image."""
    name = session.get_inputs()[0].name
    started = time.perf_counter()
    (features,) = session.run(None, {name: pixels})
    return features[0], (time.perf_counter() - started) * 1000


def compare(reference: np.ndarray, features: np.ndarray) -> dict[str, float]:
    """How far `features` are from fp32's, in float64 so the metrics add no error of their own."""
    ref, got = reference.astype(np.float64), features.astype(np.float64)
    diff = got - ref
    token_cos = np.sum(ref * got, axis=-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    return {
        "cosine": float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got))),
        "min_token_cosine": float(token_cos.min()),
        "max_abs_error": float(np.abs(diff).max()),
        "relative_error": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
    }


def cosines(
    graph: Path, pixels: dict[str, np.ndarray], reference: dict[str, np.ndarray], threads: int
) -> dict[str, float]:
    """Each photo's features cosine with `reference` (fp32's) under `graph`."""
    session = make_session(graph, threads)
    return {name: compare(reference[name], encode(session, p)[0])["cosine"] for name, p in pixels.items()}


# --------------------------------------------------------------------------- the recipe


class PhotoReader(CalibrationDataReader):
    """Feeds the calibration photos' pixels, one at a time, to ORT's calibrator."""

    def __init__(self, input_name: str, pixels: Sequence[np.ndarray]) -> None:
        self._feeds = [{input_name: p} for p in pixels]
        self._next: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self._feeds[start_index:end_index])


def preprocess(fp32: Path, out: Path) -> Path:
    """ORT's recommended pre-processing for static quantization (shape inference, basic fusions)."""
    if not out.is_file():
        quant_pre_process(str(fp32), str(out))
    return out


def quantize_qdq(
    graph: Path,
    out: Path,
    calibration: Sequence[np.ndarray],
    ranges: Path,
    weights: QuantType = QuantType.QInt8,
    reduce_range: bool = False,
    nodes: Sequence[str] | None = None,
) -> None:
    """QDQ, per-channel weights of type `weights`, uint8 activations, MinMax ranges from the
    calibration pixels, on `nodes` (None: every op ORT can quantize). The ranges are floats
    whatever the types, so they are computed once into `ranges` and read back after that.
    """
    input_name = onnx.load(str(graph), load_external_data=False).graph.input[0].name
    quantize_static(
        str(graph),
        str(out),
        PhotoReader(input_name, calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=weights,
        calibration_cache_path=str(ranges),
        nodes_to_quantize=list(nodes) if nodes is not None else None,
    )


def dense_convs(graph: Path) -> list[str]:
    """The names of the graph's Conv nodes with group 1 (not depthwise), in graph order."""

    def group(node: onnx.NodeProto) -> int:
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)

    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    return [node.name for node in nodes if node.op_type == "Conv" and group(node) == 1]


def runs_of(names: Sequence[str], count: int) -> list[list[str]]:
    """`names` cut into `count` runs of neighbours, as even as the length allows."""
    bounds = np.linspace(0, len(names), min(count, len(names)) + 1).round().astype(int)
    return [list(names[a:b]) for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------- the search


@dataclass
class Outcome:
    """What the tool did, as the report beside the graph states it."""

    graph: str
    kept: bool
    quantized_convs: int
    fp32_dense_convs: list[str]
    calibration_cosine: dict[str, float]
    held_out_cosine: dict[str, float]
    held_out_metrics: dict[str, dict[str, float]]
    fp32_ms: float
    int8_ms: float
    recipe: str = "static QDQ U8S8, per-channel, 7-bit weights, MinMax; dense convolutions"
    keep_cosine: float = KEEP_COSINE
    select_cosine: float = SELECT_COSINE
    onnxruntime: str = ort.__version__


class Search:
    """Quantizes the dense convolutions but `left_out`, and measures the calibration photos."""

    def __init__(
        self, graph: Path, work: Path, calibration: dict[str, np.ndarray], threads: int, ranges: Path | None = None
    ) -> None:
        """`ranges`: the calibration ranges' file (computed there on first use); default in `work`."""
        self.graph, self.work, self.calibration, self.threads = graph, work, calibration, threads
        self.ranges = ranges or work / "ranges.json"
        self.dense = dense_convs(graph)
        fp32 = make_session(graph, threads)
        self.reference = {name: encode(fp32, p)[0] for name, p in calibration.items()}
        self.trials = 0

    def build(self, left_out: Sequence[str], out: Path) -> Path:
        """The QDQ graph with every dense convolution in int8 but `left_out`, written to `out`."""
        skip = set(left_out)
        quantize_qdq(
            self.graph,
            out,
            list(self.calibration.values()),
            self.ranges,
            reduce_range=REDUCE_RANGE,
            nodes=[n for n in self.dense if n not in skip],
        )
        return out

    def worst(self, left_out: Sequence[str]) -> float:
        """The lowest calibration-photo cosine with `left_out` in fp32."""
        self.trials += 1
        graph = self.build(left_out, self.work / "trial.onnx")
        return min(cosines(graph, self.calibration, self.reference, self.threads).values())

    def choose(self) -> list[str]:
        """The dense convolutions to leave in fp32 (see the module's docstring)."""
        left_out: list[str] = []
        score = self.worst(left_out)
        log.info("every dense convolution in int8: worst calibration cosine %.4f", score)
        if score >= SELECT_COSINE:
            return left_out
        runs = runs_of(self.dense, SEARCH_RUNS)
        gains = [self.worst(run) - score for run in runs]
        for gain, run in sorted(zip(gains, runs, strict=True), key=lambda pair: -pair[0]):
            left_out += run
            score = self.worst(left_out)
            log.info("left %d in fp32 (run gain %.4f): worst calibration cosine %.4f", len(left_out), gain, score)
            if score >= SELECT_COSINE:
                break
        return left_out


def target_path(model_dir: Path) -> Path:
    """Where the int8 vision graph goes, in the directory's layout."""
    files = locate_model_files(model_dir)
    return model_dir / graph_candidates(files.layout, "vision", "int8")[0]


def quantize_vision(
    model_dir: Path, calibration_photos: Sequence[Path], held_out_photos: Sequence[Path], threads: int = 2
) -> Outcome:
    """Search, build and check the int8 vision graph; write it (and its report) only if it is kept."""
    files = locate_model_files(model_dir)
    if files.graph_precisions["vision"] != "fp32":
        raise SystemExit(f"{model_dir} has no fp32 vision graph to quantize")
    spec = model_image_spec(model_dir)
    calibration, held_out = pixels_for(calibration_photos, spec), pixels_for(held_out_photos, spec)
    target = target_path(model_dir)
    with tempfile.TemporaryDirectory(prefix="quantize-vision-") as tmp:
        work = Path(tmp)
        search = Search(preprocess(files.graphs["vision"], work / "fp32.onnx"), work, calibration, threads)
        left_out = search.choose()
        candidate = search.build(left_out, work / "int8.onnx")
        fp32, int8 = make_session(files.graphs["vision"], threads), make_session(candidate, threads)
        metrics = {n: compare(encode(fp32, p)[0], encode(int8, p)[0]) for n, p in held_out.items()}
        first = next(iter(held_out.values()))
        outcome = Outcome(
            graph=target.name,
            kept=all(m["cosine"] >= KEEP_COSINE for m in metrics.values()),
            quantized_convs=len(search.dense) - len(left_out),
            fp32_dense_convs=left_out,
            calibration_cosine=cosines(candidate, calibration, search.reference, threads),
            held_out_cosine={n: m["cosine"] for n, m in metrics.items()},
            held_out_metrics=metrics,
            fp32_ms=min(encode(fp32, first)[1] for _ in range(2)),
            int8_ms=min(encode(int8, first)[1] for _ in range(2)),
        )
        log.info("%d trials; held-out cosines %s", search.trials, outcome.held_out_cosine)
        if outcome.kept:
            remove_graph(target)
            candidate.replace(target)
            target.with_suffix(".json").write_text(json.dumps(asdict(outcome), indent=2) + "\n")
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--photos", type=Path, nargs="+", help="calibration photos (default: scikit-image's)")
    parser.add_argument("--held-out", type=Path, nargs="+", help="photos for the verdict (default: scikit-image's)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # onnxruntime's quantizers say much at INFO
    log.setLevel(logging.INFO)
    calibration = args.photos or [bundled_photo(n) for n in CALIBRATION_PHOTOS]
    held_out = args.held_out or [bundled_photo(n) for n in HELD_OUT_PHOTOS]
    if {p.resolve() for p in calibration} & {p.resolve() for p in held_out}:
        raise SystemExit("a held-out photo is also a calibration photo: the verdict needs photos calibration never saw")
    outcome = quantize_vision(args.model_dir.expanduser(), calibration, held_out, args.threads)
    worst = min(outcome.held_out_cosine.values())
    if not outcome.kept:
        print(f"not written: the worst held-out photo's features cosine is {worst:.4f} < {KEEP_COSINE}")
        return 1
    print(
        f"{target_path(args.model_dir.expanduser())}: {outcome.quantized_convs} convolutions in int8, "
        f"{len(outcome.fp32_dense_convs)} dense ones left in fp32; worst held-out cosine {worst:.4f}; "
        f"encode {outcome.int8_ms:.0f} ms against fp32's {outcome.fp32_ms:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
