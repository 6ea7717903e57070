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
from lumen_vlm.fastvlm.exceptions import InputError
from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, GenerationParams, GenerationRequest, PreparedRequest
from lumen_vlm.generation import FinishReason
from lumen_vlm.resources.exceptions import ModelFilesError
from lumen_vlm.resources.model_files import locate_model_files

from ..parity import assert_case_matches, generate_text, golden_request, prefill_logits


def test_facts_come_from_the_sessions(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    text = config["text_config"]
    backend = FastVLMONNXBackend(locate_model_files(tiny_model_dir))
    spec = backend.graph_spec.decoder
    assert spec.num_layers == text["num_hidden_layers"]
    assert spec.num_kv_heads == text["num_key_value_heads"]
    assert spec.head_dim == text["hidden_size"] // text["num_attention_heads"]
    assert spec.hidden_size == text["hidden_size"]
    assert spec.vocab_size == text["vocab_size"]
    assert backend.graph_spec.image_tokens == config["image_seq_length"]
    assert backend.info.runtime == "onnxrt-cpu"
    assert backend.info.providers == ("CPUExecutionProvider",)


def test_image_size_matches_the_preprocessor_config(tiny_model_dir: Path) -> None:
    preprocessor = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    backend = FastVLMONNXBackend(locate_model_files(tiny_model_dir))
    assert backend.graph_spec.image_size == preprocessor["crop_size"]["height"]


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
    q_logits = prefill_logits(quantized, prepared)
    r_logits = prefill_logits(reference, prepared)
    # Quantization perturbs the logits but must keep them close to fp32's.
    correlation = np.corrcoef(q_logits, r_logits)[0, 1]
    assert correlation > 0.98
    assert quantized.backend.info.precision == precision
    result = generate_text(quantized, golden_request(case))
    assert result.generated_tokens == case["max_new_tokens"] or result.finish_reason is FinishReason.EOS
    assert result.text


def test_int8_as_8_bit_matmulnbits_loads_and_stays_close_to_fp32(
    quantized_model_dir: Path, golden: dict[str, Any], tmp_path: Path
) -> None:
    """tools/quantize_model's other int8 form (auto's choice on AVX-512 VNNI CPUs): the same
    file name, 8-bit MatMulNBits weights, no MatMulInteger."""
    from tools.quantize_model import quantize_decoder

    model_dir = tmp_path / "tiny"
    shutil.copytree(quantized_model_dir, model_dir)
    decoder = quantize_decoder(model_dir, "int8", int8_form="nbits")
    nodes = onnx.load(str(decoder)).graph.node
    assert {node.op_type for node in nodes} & {"MatMulInteger", "DynamicQuantizeLinear"} == set()
    bits = {attr.i for node in nodes if node.op_type == "MatMulNBits" for attr in node.attribute if attr.name == "bits"}
    assert bits == {8}

    quantized = FastVLMModelManager.from_model_dir(model_dir, precision="int8")
    reference = FastVLMModelManager.from_model_dir(model_dir)
    case = golden["cases"][0]
    prepared = quantized.prepare(golden_request(case))
    correlation = np.corrcoef(prefill_logits(quantized, prepared), prefill_logits(reference, prepared))[0, 1]
    assert correlation > 0.98
    assert generate_text(quantized, golden_request(case)).text


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
    features = np.zeros((3, manager.backend.graph_spec.decoder.hidden_size), dtype=np.float32)
    ids = np.array([1, 2, manager.spec.text.image_token_id, 3], dtype=np.int64)
    prepared = PreparedRequest(ids, features, max_new_tokens=1, started=0.0)
    with pytest.raises(InputError, match="1 image tokens but the image gave 3 features"):
        prefill_logits(manager, prepared)


def test_a_slot_without_room_is_refused(manager: FastVLMModelManager) -> None:
    backend = manager.backend
    cache = backend.new_kv_cache(1, 4)
    with pytest.raises(BackendInputError, match="the KV slot holds 4 tokens; 0 are used and 5 more do not fit"):
        backend.forward(cache, [0], backend.embed(np.arange(10, 15))[None])


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
    assert lumen.spec.model_id == "fastvlm-tiny"
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
    assert eos_token in manager.spec.text.eos_token_ids
    result = generate_text(manager, golden_request(case))
    assert result.finish_reason is FinishReason.EOS
    assert list(result.token_ids) == case["output_ids"][: stop_at + 1]
    assert result.generated_tokens == stop_at + 1


def test_max_new_tokens_is_clamped_to_the_context(manager: FastVLMModelManager, golden: dict[str, Any]) -> None:
    case = golden["cases"][0]
    request = golden_request(case)
    prepared = manager.prepare(
        GenerationRequest(request.messages, request.image, GenerationParams(max_new_tokens=10**6))
    )
    assert prepared.max_new_tokens == manager.spec.text.context_length - prepared.input_ids.size


def test_forward_keeps_one_row_of_logits(manager: FastVLMModelManager) -> None:
    # The graph computes logits for every prompt position here: a view of the last row would
    # keep the whole [seq, vocab] block alive with the sequence, unaccounted.
    backend = manager.backend
    cache = backend.new_kv_cache(1, 64)
    logits = backend.forward(cache, [0], backend.embed(np.arange(10, 60, dtype=np.int64))[None])
    assert not backend.last_position_logits
    assert logits.base is None and logits.shape == (1, backend.graph_spec.decoder.vocab_size)
