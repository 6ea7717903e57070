"""Decoder graphs whose inputs differ from the committed export's: fed what they declare, or
refused at load with the input's name.

Each variant is made from the committed tiny decoder (see decoder_variants) and must give
transformers' golden tokens, both as it is and through the derived copy the server uses (the
rewrites in <cache_dir>/ort-optimized), which must handle it or be skipped with a reason.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto

from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager
from lumen_vlm.resources.exceptions import ModelFilesError

from ..parity import assert_case_matches
from . import decoder_variants

DECODER = "decoder_model_merged.onnx"
EMBED = "embed_tokens.onnx"


def variant_dir(source: Path, target: Path, decoder: Callable[[onnx.ModelProto], Any], embed: Any = None) -> Path:
    """A copy of the model whose decoder (and embedding, if given) is rewritten."""
    shutil.copytree(source, target)
    for name, change in ((DECODER, decoder), (EMBED, embed)):
        if change is not None:
            path = target / "onnx" / name
            onnx.save(change(onnx.load(str(path))), str(path))
    return target


VARIANTS: dict[str, tuple[Callable[[onnx.ModelProto], Any], Any]] = {
    "num_logits_to_keep slicing the logits": (lambda m: decoder_variants.keep_logits(m, "logits"), None),
    "num_logits_to_keep slicing the hidden states": (lambda m: decoder_variants.keep_logits(m, "hidden"), None),
    "int32 ids, mask and positions": (
        lambda m: decoder_variants.int32_indices(m, ["attention_mask", "position_ids"]),
        lambda m: decoder_variants.int32_indices(m, ["input_ids"]),
    ),
    "use_cache_branch": (decoder_variants.cache_branch, None),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[str, Path]:
    decoder, embed = VARIANTS[request.param]
    return request.param, variant_dir(tiny_model_dir, tmp_path_factory.mktemp("variant") / "model", decoder, embed)


def test_a_variant_gives_the_golden_tokens_as_it_is(variant: tuple[str, Path], golden: dict[str, Any]) -> None:
    manager = FastVLMModelManager.from_model_dir(variant[1])
    # The multi-turn case also runs the prefix cache's split: a first pass, then one with a past.
    for case in (golden["cases"][0], next(c for c in golden["cases"] if c["name"] == "multi_turn")):
        assert_case_matches(manager, case)


def test_a_variant_gives_the_golden_tokens_through_the_derived_decoder(
    variant: tuple[str, Path], golden: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name, model_dir = variant
    with caplog.at_level(logging.INFO, logger="lumen_vlm.graphs"):
        manager = FastVLMModelManager.from_model_dir(model_dir, optimized_graph_dir=tmp_path / "ort-optimized")
    backend = manager.backend
    if name == "use_cache_branch":
        # An If over two decoders: the rewrites, which read the top-level graph, are skipped.
        assert backend.fused_attention_layers == 0
        assert "no rewrite applies, its outputs come from a control-flow If node on use_cache_branch" in caplog.text
    else:
        assert backend.fused_attention_layers == backend.graph_spec.decoder.num_layers, caplog.text
    for case in golden["cases"]:
        assert_case_matches(manager, case)


def test_num_logits_to_keep_gives_one_row_of_logits(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = variant_dir(tiny_model_dir, tmp_path / "model", VARIANTS["num_logits_to_keep slicing the logits"][0])
    manager = FastVLMModelManager.from_model_dir(model_dir)
    # The graph computes the last position's logits itself; a [seq, vocab] buffer would not fit.
    assert manager.backend.last_position_logits


@pytest.mark.parametrize(
    "name, elem_type, message",
    [
        ("token_type_ids", TensorProto.INT64, "inputs this engine does not know how to feed: token_type_ids"),
        ("num_logits_to_keep", TensorProto.FLOAT, r"input num_logits_to_keep is tensor\(float\)"),
        ("use_cache_branch", TensorProto.INT64, r"input use_cache_branch is tensor\(int64\).*tensor\(bool\)"),
    ],
)
def test_an_input_the_engine_cannot_feed_is_refused_at_load(
    tmp_path: Path, tiny_model_dir: Path, name: str, elem_type: int, message: str
) -> None:
    model_dir = variant_dir(
        tiny_model_dir, tmp_path / "model", lambda m: decoder_variants.extra_input(m, name, elem_type)
    )
    with pytest.raises(ModelFilesError, match=message):
        FastVLMModelManager.from_model_dir(model_dir)
