"""tools/quantize_vision.py on the tiny model: the int8 vision graph it writes, its search, its verdict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import tools.quantize_vision as qv
from lumen_vlm.fastvlm.image import image_to_pixels
from lumen_vlm.resources.model_files import locate_model_files

from .conftest import FIXTURES

GOLDEN = FIXTURES / "golden"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    """(calibration, held-out) photo files: the golden photos, and a mirrored and a rotated copy."""
    folder = tmp_path_factory.mktemp("photos")
    mirrored, rotated = folder / "mirrored.png", folder / "rotated.jpg"
    Image.open(GOLDEN / "landscape.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    Image.open(GOLDEN / "portrait.jpg").rotate(90, expand=True).save(rotated)
    return [GOLDEN / "portrait.jpg", mirrored], [GOLDEN / "landscape.png", rotated]


@pytest.fixture()
def model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    target = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, target)
    return target


def op_counts(graph: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(graph)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def features(graph: Path, photo: Path, model_dir: Path) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    pixels = image_to_pixels(photo.read_bytes(), qv.model_image_spec(model_dir))
    return session.run(None, {session.get_inputs()[0].name: pixels})[0].ravel().astype(np.float64)


def test_writes_an_int8_vision_graph_that_keeps_the_features(model_dir: Path, photos) -> None:  # type: ignore[no-untyped-def]
    calibration, held_out = photos
    assert qv.main([str(model_dir), "--photos", *map(str, calibration), "--held-out", *map(str, held_out)]) == 0

    graph = model_dir / "onnx" / "vision_encoder_int8.onnx"
    ops = op_counts(graph)
    dense = len(qv.dense_convs(model_dir / "onnx" / "vision_encoder.onnx"))
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    report = json.loads(graph.with_suffix(".json").read_text())
    assert report["kept"] and report["quantized_convs"] == dense - len(report["fp32_dense_convs"]) > 0
    assert set(report["held_out_cosine"]) == {p.name for p in held_out}
    # The verdict, measured again here with plain ORT sessions.
    for photo in held_out:
        ref, got = (
            features(model_dir / "onnx" / "vision_encoder.onnx", photo, model_dir),
            features(graph, photo, model_dir),
        )
        cosine = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))
        assert cosine >= qv.KEEP_COSINE
        assert cosine == pytest.approx(report["held_out_cosine"][photo.name], abs=1e-6)
        assert not np.array_equal(ref, got)  # it is quantized, not a copy

    files = locate_model_files(model_dir, "fp32", vision_precision="int8")
    assert files.graph_precisions == {"vision": "int8", "embed": "fp32", "decoder": "fp32"}


def test_the_weights_fit_in_7_bits_so_no_cpu_saturates(model_dir: Path, photos) -> None:  # type: ignore[no-untyped-def]
    """CPUs without VNNI add pairs of u8 x s8 products in int16: 2 x 255 x 64 fits, 2 x 255 x 127
    does not. So every int8 weight the tool writes lies in [-64, 64], and the verdict it measured
    holds on those CPUs too."""
    calibration, held_out = photos
    assert qv.quantize_vision(model_dir, calibration, held_out, threads=1).kept
    graph = onnx.load(str(model_dir / "onnx" / "vision_encoder_int8.onnx"))
    weights = [  # the convolutions' kernels; their zero points are int8 too, all 0
        onnx.numpy_helper.to_array(t)
        for t in graph.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4
    ]
    assert len(weights) == len(qv.dense_convs(model_dir / "onnx" / "vision_encoder.onnx")) - len(
        json.loads((model_dir / "onnx" / "vision_encoder_int8.json").read_text())["fp32_dense_convs"]
    )
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64


def test_the_served_model_runs_the_int8_vision_graph(model_dir: Path, photos) -> None:  # type: ignore[no-untyped-def]
    """vision_precision int8 loads the tool's graph beside the fp32 decoder, and its features are
    that graph's (not fp32's)."""
    from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager

    calibration, held_out = photos
    assert qv.quantize_vision(model_dir, calibration, held_out, threads=1).kept
    photo = GOLDEN / "landscape.png"
    direct = features(model_dir / "onnx" / "vision_encoder_int8.onnx", photo, model_dir)
    fp32 = features(model_dir / "onnx" / "vision_encoder.onnx", photo, model_dir)
    manager = FastVLMModelManager.from_model_dir(model_dir, vision_precision="int8")
    try:
        assert manager.backend.info.precisions == ("fp32", "int8")
        served = manager.image_features(photo.read_bytes())[0].ravel().astype(np.float64)
    finally:
        manager.close()
    np.testing.assert_allclose(served, direct, rtol=1e-4, atol=1e-4)
    assert np.abs(served - fp32).max() > 10 * np.abs(served - direct).max()


def test_nothing_is_written_when_a_held_out_photo_misses_the_rule(
    model_dir: Path, photos, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    calibration, held_out = photos
    monkeypatch.setattr(qv, "KEEP_COSINE", 1.000001)  # no quantized graph can reach it
    status = qv.main([str(model_dir), "--photos", *map(str, calibration), "--held-out", *map(str, held_out)])
    assert status == 1
    assert "not written: the worst held-out photo's features cosine is" in capsys.readouterr().out
    assert not list((model_dir / "onnx").glob("vision_encoder_int8*"))


def test_the_search_leaves_the_most_helpful_runs_in_fp32(model_dir: Path, photos, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With a target no graph meets, the search tries each run alone, then leaves runs in fp32
    one at a time in the order of their gain, until all are."""
    calibration, _ = photos
    monkeypatch.setattr(qv, "SELECT_COSINE", 1.000001)
    graph = model_dir / "onnx" / "vision_encoder.onnx"
    spec = qv.model_image_spec(model_dir)
    work = model_dir / "work"
    work.mkdir()
    search = qv.Search(qv.preprocess(graph, work / "fp32.onnx"), work, qv.pixels_for(calibration, spec), threads=1)
    left_out = search.choose()
    runs = qv.runs_of(search.dense, qv.SEARCH_RUNS)
    assert sorted(left_out) == sorted(search.dense)
    assert search.trials == 1 + 2 * len(runs)


def test_runs_cover_the_names_in_order() -> None:
    names = [f"conv{i}" for i in range(10)]
    runs = qv.runs_of(names, 4)
    assert [name for run in runs for name in run] == names
    assert sorted(len(run) for run in runs) == [2, 2, 3, 3]
    assert qv.runs_of(names[:3], 8) == [["conv0"], ["conv1"], ["conv2"]]


def test_a_photo_in_both_sets_is_refused(model_dir: Path) -> None:
    with pytest.raises(SystemExit, match="a held-out photo is also a calibration photo"):
        qv.main([str(model_dir), "--photos", str(GOLDEN / "portrait.jpg"), "--held-out", str(GOLDEN / "portrait.jpg")])
