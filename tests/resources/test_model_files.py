"""The published model layouts: Lumen's model_info.json facts, file names and precisions, the
onnx-community resize rule. Every directory is built from the tiny model in a tmp dir."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnxruntime.transformers.float16 import convert_float_to_float16

from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager
from lumen_vlm.fastvlm.image import image_to_pixels
from lumen_vlm.resources.exceptions import ModelFilesError
from lumen_vlm.resources.model_files import (
    fallback_precisions,
    locate_model_files,
    lumen_precision_name,
    read_file_spec,
)
from lumen_vlm.resources.model_spec import (
    DecoderSpec,
    FileSpec,
    GraphSpec,
    ImageSpec,
    ResizeMode,
    TextSpec,
    model_spec,
)
from tests.conftest import TINY_MODEL
from tests.parity import assert_case_matches, generate_text, golden_request

from .model_dirs import TOKENIZER_MAX_LENGTH, community_model, edit_json, lumen_model, tiny_graph, tiny_json


def no_image_token(text: str) -> int | None:
    """A tokenizer's token_to_id that knows no ``<image>`` token but the tiny model's eos."""
    return {"<|im_end|>": 4002}.get(text)


# --------------------------------------------------------------------------- the Lumen layout


def test_a_lumen_model_with_only_model_info_and_a_dynamic_vision_input_serves(
    tmp_path: Path, golden: dict[str, Any]
) -> None:
    model_dir = lumen_model(tmp_path / "FastVLM-tiny", dynamic_vision=True)
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "model_info.json",
        "onnx",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    manager = FastVLMModelManager.from_model_dir(model_dir)
    assert manager.backend.graph_spec.image_size == 0, "the vision graph states no image size"
    assert manager.spec.image.size == 256  # extra_metadata.vision_config.image_size
    assert manager.spec.image.tokens == 16
    # generation_config.max_position_embeddings, not the tokenizer's model_max_length
    assert manager.spec.text.context_length == 1024 != TOKENIZER_MAX_LENGTH
    assert manager.spec.text.eos_token_ids == {4002}
    assert manager.spec.image.mode is ResizeMode.PAD  # no preprocessor config: Apple's rule, as upstream
    assert manager.describe().model_id == "FastVLM-tiny"
    for case in golden["cases"]:
        assert_case_matches(manager, case)


def test_model_info_states_the_image_token_context_and_vision_facts(tmp_path: Path) -> None:
    model_dir = lumen_model(tmp_path / "m")

    def change(info: dict[str, Any]) -> None:
        extra = info["extra_metadata"]
        extra["generation_config"].update(image_token_index=4001, max_position_embeddings=777)
        extra["vision_config"].update(image_size=320, patch_size=32, mean=[0.5, 0.25, 0.125], std=[2.0, 4.0, 8.0])

    edit_json(model_dir / "model_info.json", change)
    stated = read_file_spec(locate_model_files(model_dir), no_image_token)
    assert stated.text.image_token_id == 4001  # from generation_config: the tokenizer knows no <image>
    assert stated.text.context_length == 777
    assert stated.image == ImageSpec(
        size=320, image_mean=(0.5, 0.25, 0.125), image_std=(2.0, 4.0, 8.0), mode=ResizeMode.PAD, patch_size=32
    )
    assert stated.image.tokens_for(320) == 100
    assert stated.kv_cache is not None and stated.kv_cache.num_hidden_layers == 2


def settled_image(stated: ImageSpec, image_size: int, image_tokens: int | None) -> ImageSpec:
    """The model spec's image, for files stating `stated` and a vision graph of this size and token count."""
    text = TextSpec(image_token_id=1, eos_token_ids=frozenset({2}), chat_template="{{ messages }}", context_length=64)
    decoder = DecoderSpec(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, vocab_size=100)
    return model_spec(FileSpec("m", text, stated), GraphSpec(image_size, image_tokens, decoder)).image


def test_image_size_and_tokens_come_from_the_graph_else_the_files() -> None:
    stated = ImageSpec(size=256, patch_size=64)
    assert settled_image(stated, image_size=0, image_tokens=None).size == 256
    assert settled_image(stated, image_size=0, image_tokens=None).tokens == 16  # (256 / 64)^2
    from_graph = settled_image(ImageSpec(size=0), image_size=512, image_tokens=64)
    assert (from_graph.size, from_graph.tokens) == (512, 64)
    assert settled_image(ImageSpec(size=0), image_size=512, image_tokens=None).tokens is None  # neither says
    with pytest.raises(ModelFilesError, match="takes 512-pixel images, but the model's files state 256"):
        settled_image(stated, image_size=512, image_tokens=None)
    with pytest.raises(ModelFilesError, match=r"gives 25 image tokens.*means 16"):
        settled_image(stated, image_size=256, image_tokens=25)
    with pytest.raises(ModelFilesError, match="no image size"):
        settled_image(ImageSpec(size=0), image_size=0, image_tokens=None)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda extra: extra["vision_config"].update(image_size=512),
            "vision encoder graph takes 256-pixel images, but the model's files state 512",
        ),
        (
            lambda extra: extra["vision_config"].update(patch_size=32),
            "gives 16 image tokens, but model_info.json's vision_config .* means 64",
        ),
        (
            lambda extra: extra["kv_cache_config"].update(num_hidden_layers=24),
            "kv_cache_config.num_hidden_layers is 24, but the decoder graph's is 2",
        ),
        (
            lambda extra: extra["kv_cache_config"].update(head_dim=64),
            "kv_cache_config.head_dim is 64, but the decoder graph's is 16",
        ),
    ],
)
def test_model_info_that_contradicts_the_graphs_is_refused(tmp_path: Path, change: Any, message: str) -> None:
    model_dir = lumen_model(tmp_path / "m")
    edit_json(model_dir / "model_info.json", lambda info: change(info["extra_metadata"]))
    with pytest.raises(ModelFilesError, match=message):
        FastVLMModelManager.from_model_dir(model_dir)


# --------------------------------------------------------------------------- file names and precisions


@pytest.mark.parametrize(
    "file_name, requested, found",
    [
        ("{graph}.onnx", "fp32", "fp32"),  # upstream lumen-vlm's plain name
        ("{graph}.fp32.onnx", "fp32", "fp32"),
        ("{graph}.fp16.onnx", "fp16", "fp16"),
        ("{graph}.q4fp16.onnx", "q4f16", "q4f16"),  # lumen-resources' spelling on disk
        ("{graph}.q4fp16.onnx", "q4fp16", "q4f16"),  # and in a config
        ("{graph}.q4f16.onnx", "q4fp16", "q4f16"),
        ("{graph}.int8.onnx", "int8", "int8"),
    ],
)
def test_lumen_file_names(tmp_path: Path, file_name: str, requested: str, found: str) -> None:
    names = {graph: file_name.format(graph=graph) for graph in ("vision", "embed", "decoder")}
    model_dir = lumen_model(tmp_path / "m", names)
    files = locate_model_files(model_dir, requested)
    assert files.layout == "lumen"
    assert files.requested_precision == found
    assert {graph: path.name for graph, path in files.graphs.items()} == names
    assert files.graph_precisions == dict.fromkeys(names, found)


def test_the_lumen_repos_spelling_goes_to_lumen_resources() -> None:
    assert lumen_precision_name("q4f16") == "q4fp16"
    assert lumen_precision_name("fp16") == "fp16"


def test_fallback_is_one_stated_order() -> None:
    assert fallback_precisions("int8") == ["int8", "fp32", "fp16", "uint8", "quantized", "q4", "q4f16", "bnb4"]
    assert fallback_precisions("fp32")[:2] == ["fp32", "fp16"]


def fp16_graph(source: Path, target: Path) -> None:
    onnx.save(convert_float_to_float16(onnx.load(str(source))), str(target))


def test_a_mixed_directory_loads_each_graph_in_the_best_precision_present(
    tmp_path: Path, golden: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # What lumen-app's fp16 default meets: an fp16 vision encoder beside fp32 embedding and decoder.
    model_dir = lumen_model(tmp_path / "m", {"vision": "vision.fp16.onnx", "embed": "embed.onnx"})
    fp16_graph(tiny_graph("vision"), model_dir / "onnx" / "vision.fp16.onnx")
    files = locate_model_files(model_dir, "fp16")
    assert files.graph_precisions == {"vision": "fp16", "embed": "fp32", "decoder": "fp32"}
    assert files.precision == "fp32"

    with caplog.at_level(logging.INFO, logger="lumen_vlm.backends.onnxrt_backend"):
        mixed = FastVLMModelManager.from_model_dir(model_dir, precision="fp16")
    lines = {(r.levelno, r.getMessage()) for r in caplog.records if " graph: " in r.getMessage()}
    assert lines == {
        (logging.INFO, "vision graph: onnx/vision.fp16.onnx (fp16)"),
        (logging.WARNING, f"embed graph: onnx/embed.onnx (fp32): {model_dir} has no fp16 embed graph"),
        (logging.WARNING, f"decoder graph: onnx/decoder.fp32.onnx (fp32): {model_dir} has no fp16 decoder graph"),
    }
    described = mixed.describe()
    assert described.precision == "fp32" and described.precisions == ("fp32", "fp16")
    assert mixed.backend.info.precisions == ("fp32", "fp16")

    # The fp16 encoder really runs in fp16, and its features stay close to fp32's.
    case = golden["cases"][0]
    pixels = image_to_pixels(case["image_bytes"], mixed.spec.image)
    reference = FastVLMModelManager.from_model_dir(TINY_MODEL)
    assert mixed.backend.graph_spec == reference.backend.graph_spec
    difference = np.abs(mixed.backend.encode_image(pixels) - reference.backend.encode_image(pixels)).max()
    assert 0 < difference < 1e-2
    result = generate_text(mixed, golden_request(case))
    assert result.generated_tokens == case["max_new_tokens"] and result.text


def test_the_vision_graph_can_have_a_precision_of_its_own(tmp_path: Path) -> None:
    # What tools/quantize_vision.py leaves: an int8 vision encoder beside q4 and fp32 decoders.
    model_dir = community_model(tmp_path / "m")
    for name in ("vision_encoder_int8.onnx", "decoder_model_merged_q4.onnx"):
        (model_dir / "onnx" / name).write_bytes(b"")
    files = locate_model_files(model_dir, "q4", vision_precision="int8")
    assert files.graph_precisions == {"vision": "int8", "embed": "fp32", "decoder": "q4"}
    assert locate_model_files(model_dir, "q4").graph_precisions["vision"] == "fp32"  # unset: the decoder's
    assert locate_model_files(model_dir, "fp32", vision_precision="fp16").graph_precisions["vision"] == "fp32"
    with pytest.raises(ModelFilesError, match="unknown precision 'int9'"):
        locate_model_files(model_dir, "q4", vision_precision="int9")


def test_prompts_can_run_through_a_decoder_graph_of_another_precision(tmp_path: Path) -> None:
    model_dir = community_model(tmp_path / "m")
    for name in ("decoder_model_merged_int8.onnx", "decoder_model_merged_q4.onnx"):
        (model_dir / "onnx" / name).write_bytes(b"")
    files = locate_model_files(model_dir, "q4", prefill_precision="int8")
    assert files.graphs["prefill"] == model_dir / "onnx" / "decoder_model_merged_int8.onnx"
    assert files.graph_precisions == {"vision": "fp32", "embed": "fp32", "decoder": "q4", "prefill": "int8"}
    assert files.precision == "q4"
    # The decoder's own precision, or none asked: the decoder runs prompts too.
    assert "prefill" not in locate_model_files(model_dir, "q4", prefill_precision="q4").graphs
    assert "prefill" not in locate_model_files(model_dir, "q4").graphs
    # No fallback: another precision would not prefill faster, so a missing one is an error.
    with pytest.raises(
        ModelFilesError, match=r"has no fp16 decoder graph for prompts \(expected onnx/decoder_model_merged_fp16.onnx\)"
    ):
        locate_model_files(model_dir, "q4", prefill_precision="fp16")
    with pytest.raises(ModelFilesError, match="unknown precision 'int9'"):
        locate_model_files(model_dir, "q4", prefill_precision="int9")


def test_a_graph_missing_in_every_precision_names_what_is_there(tmp_path: Path) -> None:
    model_dir = lumen_model(tmp_path / "m", {"decoder": "decoder.fp16.onnx"})
    (model_dir / "onnx" / "decoder.fp16.onnx").unlink()
    with pytest.raises(ModelFilesError) as caught:
        locate_model_files(model_dir, "int8")
    message = str(caught.value)
    assert "no int8 decoder graph (expected onnx/decoder.int8.onnx), nor one in another precision" in message
    assert "graphs present: embed.fp32.onnx, vision.fp32.onnx" in message


# --------------------------------------------------------------------------- the resize rule


@pytest.mark.parametrize(
    "aspect_ratio, preprocessor_crops, expected",
    [
        ("pad", True, ResizeMode.PAD),  # the onnx-community export: the model config wins
        (None, True, ResizeMode.CROP),  # no rule in the model config: the preprocessor's crop
        ("square", False, ResizeMode.CROP),  # LLaVA's "processor alone"
        (None, False, ResizeMode.PAD),
    ],
)
def test_the_default_resize_rule(
    tmp_path: Path, aspect_ratio: str | None, preprocessor_crops: bool, expected: ResizeMode
) -> None:
    model_dir = community_model(tmp_path / "m", aspect_ratio)
    edit_json(model_dir / "preprocessor_config.json", lambda pre: pre.update(do_center_crop=preprocessor_crops))
    stated = read_file_spec(locate_model_files(model_dir), no_image_token)
    assert stated.image.mode is expected


def test_a_lumen_vision_config_states_the_aspect_ratio_pad_by_default(tmp_path: Path) -> None:
    model_dir = lumen_model(tmp_path / "m")
    # lumen-resources also fetches a preprocessor_config.json where the repo has one: its crop
    # does not win over the vision_config, which upstream lumen-vlm reads as pad.
    shutil.copy(TINY_MODEL / "preprocessor_config.json", model_dir / "preprocessor_config.json")
    assert read_file_spec(locate_model_files(model_dir), no_image_token).image.mode is ResizeMode.PAD
    edit_json(
        model_dir / "model_info.json",
        lambda info: info["extra_metadata"]["vision_config"].update(image_aspect_ratio="square"),
    )
    assert read_file_spec(locate_model_files(model_dir), no_image_token).image.mode is ResizeMode.CROP


@pytest.mark.parametrize("aspect_ratio, default", [("pad", ResizeMode.PAD), (None, ResizeMode.CROP)])
def test_a_request_resize_mode_overrides_the_models_rule(
    tmp_path: Path, golden: dict[str, Any], aspect_ratio: str | None, default: ResizeMode
) -> None:
    # The tiny transformers export names no aspect ratio and its preprocessor centre-crops.
    assert "image_aspect_ratio" not in tiny_json("config.json")
    assert tiny_json("preprocessor_config.json")["do_center_crop"] is True
    model_dir = community_model(tmp_path / "m", aspect_ratio)
    manager = FastVLMModelManager.from_model_dir(model_dir)
    assert manager.spec.image.mode is default
    assert manager.spec.text.eos_token_ids == {4002}  # generation_config's single id (and the tokenizer's eos)
    cases = {case["resize_mode"]: case for case in golden["cases"] if case["image"] == "portrait.jpg"}
    other = ResizeMode.CROP if default is ResizeMode.PAD else ResizeMode.PAD
    for mode, override in ((default, None), (other, other)):
        reference = cases[mode.value]["arrays"]["pixel_values"]
        features, _ = manager.image_features(cases[mode.value]["image_bytes"], override)
        np.testing.assert_allclose(features, manager.backend.encode_image(reference), atol=1e-6, rtol=0)
    for mode in ResizeMode:  # and the whole generation, with each mode asked for
        assert_case_matches(manager, cases[mode.value])
