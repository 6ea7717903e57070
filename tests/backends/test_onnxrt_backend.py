"""The ONNX Runtime backend on the tiny model: facts from sessions, precisions, providers, layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from lumen_vlm.backends.backend_exceptions import BackendInputError, BackendLoadError
from lumen_vlm.backends.onnxrt_backend import FastVLMONNXBackend, select_providers
from lumen_vlm.backends.optimized_graphs import OptimizedGraphCache, source_ids
from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, GenerationParams, GenerationRequest
from lumen_vlm.generation import FinishReason
from lumen_vlm.resources.exceptions import ModelFilesError
from lumen_vlm.resources.model_files import locate_model_files

from ..parity import assert_case_matches, golden_request


def test_facts_come_from_the_sessions(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    text = config["text_config"]
    backend = FastVLMONNXBackend(locate_model_files(tiny_model_dir))
    spec = backend.decoder_spec
    assert spec.num_layers == text["num_hidden_layers"]
    assert spec.num_kv_heads == text["num_key_value_heads"]
    assert spec.head_dim == text["hidden_size"] // text["num_attention_heads"]
    assert spec.hidden_size == text["hidden_size"]
    assert spec.vocab_size == text["vocab_size"]
    assert backend.vision_spec.image_tokens == config["image_seq_length"]
    assert backend.info.runtime == "onnxrt-cpu"
    assert backend.info.providers == ("CPUExecutionProvider",)


def test_image_size_matches_the_preprocessor_config(tiny_model_dir: Path) -> None:
    preprocessor = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    backend = FastVLMONNXBackend(locate_model_files(tiny_model_dir))
    assert backend.vision_spec.image_size == preprocessor["crop_size"]["height"]


@pytest.mark.parametrize("precision, op", [("int8", "MatMulInteger"), ("q4", "MatMulNBits")])
def test_quantized_decoders_load_and_generate(
    quantized_model_dir: Path, golden: dict[str, Any], precision: str, op: str
) -> None:
    files = locate_model_files(quantized_model_dir, precision)
    assert files.graphs["decoder"].name == f"decoder_model_merged_{precision}.onnx"
    assert op in {node.op_type for node in onnx.load(str(files.graphs["decoder"])).graph.node}
    # Vision and embedding have no such variant here, so they fall back to fp32.
    assert files.graph_precisions == {"vision": "fp32", "embed": "fp32", "decoder": precision}

    quantized = FastVLMModelManager.from_model_dir(quantized_model_dir, precision=precision)
    reference = FastVLMModelManager.from_model_dir(quantized_model_dir)
    case = golden["cases"][0]
    prepared = quantized.prepare(golden_request(case))
    q_logits = quantized.backend.prefill(prepared.input_ids, prepared.image_features, quantized.facts.image_token_id)
    r_logits = reference.backend.prefill(prepared.input_ids, prepared.image_features, reference.facts.image_token_id)
    # Quantization perturbs the logits but must keep them close to fp32's.
    correlation = np.corrcoef(q_logits.logits, r_logits.logits)[0, 1]
    assert correlation > 0.98
    assert quantized.backend.info.precision == precision
    result = quantized.generate_text(golden_request(case))
    assert result.generated_tokens == case["max_new_tokens"] or result.finish_reason is FinishReason.EOS
    assert result.text


def test_a_missing_precision_falls_back_to_the_best_present(quantized_model_dir: Path) -> None:
    # No fp16 graph at all: each graph takes the first of FALLBACK_ORDER present, fp32 (not int8 or q4).
    files = locate_model_files(quantized_model_dir, "fp16")
    assert files.requested_precision == "fp16"
    assert files.graph_precisions == {"vision": "fp32", "embed": "fp32", "decoder": "fp32"}
    assert files.graphs["decoder"].name == "decoder_model_merged.onnx"
    # q4f16 is missing too; q4 is not its fallback, fp32 is: one stated order for every request.
    assert locate_model_files(quantized_model_dir, "q4f16").precision == "fp32"


def test_an_unknown_precision_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelFilesError, match="unknown precision 'fp8'"):
        locate_model_files(tiny_model_dir, "fp8")


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError, match="not a FastVLM model directory"):
        locate_model_files(tmp_path)


def test_provider_selection() -> None:
    assert select_providers("auto", available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers("auto", available=["CPUExecutionProvider", "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert select_providers("cuda", available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    configured = [["CUDAExecutionProvider", {"device_id": 1}], "CPUExecutionProvider"]
    assert select_providers("cpu", configured, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    with pytest.raises(BackendLoadError, match="needs CUDAExecutionProvider"):
        select_providers("cuda", available=["CPUExecutionProvider"])
    with pytest.raises(BackendLoadError, match="unknown device 'tpu'"):
        select_providers("tpu", available=["CPUExecutionProvider"])
    with pytest.raises(BackendLoadError, match="not available"):
        select_providers("auto", ["TensorrtExecutionProvider"], ["CPUExecutionProvider"])


def test_prefill_checks_the_image_token_count(manager: FastVLMModelManager) -> None:
    features = np.zeros((3, manager.backend.decoder_spec.hidden_size), dtype=np.float32)
    ids = np.array([1, 2, manager.facts.image_token_id, 3], dtype=np.int64)
    with pytest.raises(BackendInputError, match="1 image tokens but the image gave 3 features"):
        manager.backend.prefill(ids, features, manager.facts.image_token_id)


def lumen_layout_copy(source: Path, target: Path) -> Path:
    """The tiny model re-laid as a Lumen model: model_info.json + onnx/{graph}.{precision}.onnx."""
    target.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)
    (target / "onnx").mkdir()
    for graph, community in (
        ("vision", "vision_encoder"),
        ("embed", "embed_tokens"),
        ("decoder", "decoder_model_merged"),
    ):
        shutil.copy(source / "onnx" / f"{community}.onnx", target / "onnx" / f"{graph}.fp32.onnx")
    extra = {
        key: json.loads((source / f"{name}.json").read_text())
        for key, name in (
            ("config", "config"),
            ("generation_config", "generation_config"),
            ("preprocessor_config", "preprocessor_config"),
        )
    }
    model_info = {
        "name": "fastvlm-tiny",
        "version": "1.0.0",
        "description": "tiny random FastVLM",
        "model_type": "vlm",
        "source": {"format": "custom", "repo_id": "local/fastvlm-tiny"},
        "runtimes": {"onnx": {"available": True, "files": {"fp32": ["onnx/decoder.fp32.onnx"]}}},
        "extra_metadata": extra,
    }
    (target / "model_info.json").write_text(json.dumps(model_info))
    return target


def test_lumen_layout_gives_the_same_tokens(tmp_path: Path, tiny_model_dir: Path, golden: dict[str, Any]) -> None:
    model_dir = lumen_layout_copy(tiny_model_dir, tmp_path / "fastvlm-tiny")
    files = locate_model_files(model_dir)
    assert files.layout == "lumen"
    lumen = FastVLMModelManager.from_model_dir(model_dir)
    assert lumen.model_id == "fastvlm-tiny"
    for case in golden["cases"][:2]:
        assert_case_matches(lumen, case)


def test_eos_ids_are_read_from_the_generation_config(
    tmp_path: Path, tiny_model_dir: Path, golden: dict[str, Any]
) -> None:
    case = golden["cases"][0]
    stop_at = 5
    eos_token = case["output_ids"][stop_at]
    assert eos_token not in case["output_ids"][:stop_at]
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = [*generation["eos_token_id"], eos_token]
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    manager = FastVLMModelManager.from_model_dir(model_dir)
    assert eos_token in manager.facts.eos_token_ids
    result = manager.generate_text(golden_request(case))
    assert result.finish_reason is FinishReason.EOS
    assert list(result.token_ids) == case["output_ids"][: stop_at + 1]
    assert result.generated_tokens == stop_at + 1


def test_max_new_tokens_is_clamped_to_the_context(manager: FastVLMModelManager, golden: dict[str, Any]) -> None:
    case = golden["cases"][0]
    request = golden_request(case)
    prepared = manager.prepare(
        GenerationRequest(request.messages, request.image, GenerationParams(max_new_tokens=10**6))
    )
    assert prepared.max_new_tokens == manager.context_length - prepared.input_ids.size


def test_saved_optimized_graphs_give_the_same_tokens(
    tmp_path: Path, tiny_model_dir: Path, golden: dict[str, Any]
) -> None:
    cache = tmp_path / "ort-optimized"
    first = FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=cache)
    saved = sorted(p.name for p in cache.glob("*/*"))
    # ORT's optimized vision and embedding graphs, and the decoder with last-position logits.
    assert saved.count("model.onnx") == 3 and saved.count("model.onnx.data") >= 1, saved
    assert first.backend.last_position_logits, "prefill computes the last position's logits only"
    assert first.backend.fused_attention_layers == first.backend.decoder_spec.num_layers
    assert first.backend.fused_norms == 2 * first.backend.decoder_spec.num_layers + 1
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*/*")}
    again = FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=cache)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/*")} == stamps, "the second load reuses the saved graphs"
    for manager in (first, again):
        for case in golden["cases"]:
            assert_case_matches(manager, case)


def test_a_damaged_saved_graph_is_discarded(tmp_path: Path, tiny_model_dir: Path, golden: dict[str, Any]) -> None:
    cache = tmp_path / "ort-optimized"
    FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=cache)
    for graph in cache.glob("*/model.onnx"):
        graph.write_bytes(b"garbage")
    manager = FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=cache)
    assert_case_matches(manager, golden["cases"][0])


def test_a_changed_source_replaces_its_saved_graph(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    cache = tmp_path / "ort-optimized"
    FastVLMModelManager.from_model_dir(model_dir, optimized_graph_dir=cache)
    before = {p.name for p in cache.iterdir()}
    vision = model_dir / "onnx" / "vision_encoder.onnx"
    vision.write_bytes(vision.read_bytes())  # same content, new mtime: a new version of the file
    FastVLMModelManager.from_model_dir(model_dir, optimized_graph_dir=cache)
    after = {p.name for p in cache.iterdir()}
    assert len(after) == len(before) == 3, "the old save of the vision graph was removed"
    assert len(after - before) == 1


def test_an_unwritable_cache_falls_back_to_the_source_graphs(
    tmp_path: Path, tiny_model_dir: Path, golden: dict[str, Any]
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory should be")
    manager = FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=blocked)
    assert_case_matches(manager, golden["cases"][0])


def test_last_position_logits_where_the_graph_allows(tmp_path: Path, quantized_model_dir: Path) -> None:
    cache = tmp_path / "ort-optimized"
    q4 = FastVLMModelManager.from_model_dir(quantized_model_dir, precision="q4", optimized_graph_dir=cache)
    assert q4.backend.last_position_logits  # MatMulNBits output projection: sliced
    full = FastVLMModelManager.from_model_dir(quantized_model_dir, precision="q4")
    ids = np.arange(10, 60, dtype=np.int64)
    sliced, reference = q4.backend.prefill(ids, None, -1), full.backend.prefill(ids, None, -1)
    assert np.abs(sliced.logits - reference.logits).max() < 1e-4
    # int8 (dynamic quantization): the projection is a MatMulInteger chain, left as it is;
    # its attention is still fused.
    int8 = FastVLMModelManager.from_model_dir(quantized_model_dir, precision="int8", optimized_graph_dir=cache)
    assert not int8.backend.last_position_logits
    assert int8.backend.fused_attention_layers == int8.backend.decoder_spec.num_layers


def test_a_graph_no_rewrite_applies_to_is_remembered(
    tmp_path: Path, quantized_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # int8's logits cannot be sliced, and without a context length attention is not fused.
    cache = OptimizedGraphCache(tmp_path)
    source = locate_model_files(quantized_model_dir, "int8").graphs["decoder"]
    assert cache.derived_decoder(source) is None
    assert len(list(tmp_path.glob("*/unsupported.txt"))) == 1
    # The finding is kept, so the (large) source is not parsed again at the next start.
    monkeypatch.setattr(onnx, "load", lambda *args, **kwargs: pytest.fail("the source was parsed again"))
    assert cache.derived_decoder(source) is None


def test_an_earlier_versions_decoder_copy_is_removed(tmp_path: Path, tiny_model_dir: Path) -> None:
    cache = tmp_path / "ort-optimized"
    path_id, _ = source_ids(locate_model_files(tiny_model_dir).graphs["decoder"])
    earlier = cache / f"{path_id}-0123456789abcdef-last-logits"
    earlier.mkdir(parents=True)
    FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=cache)
    assert not earlier.exists()


def test_a_state_keeps_one_row_of_logits(manager: FastVLMModelManager) -> None:
    # The graph computes logits for every prompt position here: a view of the last row would
    # keep the whole [seq, vocab] block alive in a cached prefix, unaccounted.
    state = manager.backend.prefill(np.arange(10, 60, dtype=np.int64), None, -1)
    assert not manager.backend.last_position_logits
    assert state.logits.base is None and state.logits.shape == (manager.backend.decoder_spec.vocab_size,)


def test_a_rewritten_copy_that_does_not_load_is_remembered(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lumen_vlm.backends import optimized_graphs

    def broken_copy(source: Path, target: Path, *args: Any) -> dict[str, Any]:
        target.write_bytes(b"not an onnx graph")
        return {"last_position_logits": True, "fused_attention_layers": 0, "fused_norms": 0}

    monkeypatch.setattr(optimized_graphs, "_write_rewritten", broken_copy)
    cache = OptimizedGraphCache(tmp_path)
    source = locate_model_files(tiny_model_dir).graphs["decoder"]
    assert cache.derived_decoder(source, fuse_kernels=True, context_length=1024) is None
    assert [p.name for p in tmp_path.glob("*/*")] == ["unsupported.txt"]
    monkeypatch.setattr(optimized_graphs, "_write_rewritten", lambda *a: pytest.fail("rewritten again"))
    assert cache.derived_decoder(source, fuse_kernels=True, context_length=1024) is None
