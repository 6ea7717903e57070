"""A second decoder graph for prompts (`prefill_precision`): which graph runs which run, and
that the two read and write one KV cache.

The tiny model with int8 and q4 decoders: prompts through the int8 graph, steps through the q4
one, checked against each graph loaded alone, on the same KV. Both with the rewritten graphs
(one shared KV buffer per layer, the CPU's batched path) and as exported (each slot's own past
tensors)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from lumen_vlm.backends.kv_cache import SharedSlots
from lumen_vlm.backends.onnxrt_backend import PREFILL_GRAPH_MIN_TOKENS
from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager
from lumen_vlm.resources.exceptions import ModelFilesError
from lumen_vlm.resources.model_files import graph_files

from . import decoder_variants

PROMPT = np.arange(10, 10 + 3 * PREFILL_GRAPH_MIN_TOKENS)


@pytest.fixture(scope="module", params=["rewritten", "as exported"])
def backends(request: pytest.FixtureRequest, quantized_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The q4 decoder with int8 prompts, and each of the two graphs alone."""
    optimized = tmp_path_factory.mktemp("ort-optimized") if request.param == "rewritten" else None

    def load(precision: str, prefill_precision: str | None = None):  # type: ignore[no-untyped-def]
        return FastVLMModelManager.from_model_dir(
            quantized_model_dir, precision, prefill_precision=prefill_precision, optimized_graph_dir=optimized
        ).backend

    both, q4, int8 = load("q4", "int8"), load("q4"), load("int8")
    assert (both.fused_attention_layers > 0) == (request.param == "rewritten")
    return both, q4, int8


def test_a_prompt_runs_through_the_prefill_graph_and_a_step_through_the_decoder(backends) -> None:  # type: ignore[no-untyped-def]
    both, q4, int8 = backends
    assert (both.info.precision, both.prefill_precision) == ("q4", "int8")
    cache, int8_cache = both.new_kv_cache(1, 64), int8.new_kv_cache(1, 64)
    prompt = both.embed(PROMPT)[None]
    np.testing.assert_array_equal(both.forward(cache, [0], prompt), int8.forward(int8_cache, [0], prompt))
    for ours, theirs in zip(cache.read(0).arrays, int8_cache.read(0).arrays, strict=True):
        np.testing.assert_array_equal(ours, theirs)  # the int8 graph wrote the prompt's KV
    # The steps after it are the q4 decoder's, on that KV.
    q4_cache = q4.new_kv_cache(1, 64)
    q4_cache.write(0, int8_cache.read(0))
    for token in (5, 6):
        step = both.embed(np.array([token]))[:, None]
        np.testing.assert_array_equal(both.forward(cache, [0], step), q4.forward(q4_cache, [0], step))
    assert not np.array_equal(
        q4.forward(q4.new_kv_cache(1, 64), [0], prompt), int8.forward(int8.new_kv_cache(1, 64), [0], prompt)
    ), "the two graphs should differ, or this test shows nothing"


def test_the_threshold_decides_which_graph_runs(backends) -> None:  # type: ignore[no-untyped-def]
    # Few rows read every weight for little work: the decoder's smaller weights win there.
    both, q4, int8 = backends
    for tokens, alone in ((PREFILL_GRAPH_MIN_TOKENS - 1, q4), (PREFILL_GRAPH_MIN_TOKENS, int8)):
        run = both.embed(PROMPT[:tokens])[None]
        np.testing.assert_array_equal(
            both.forward(both.new_kv_cache(1, 64), [0], run), alone.forward(alone.new_kv_cache(1, 64), [0], run)
        )


def test_batched_steps_after_prompts_through_the_prefill_graph(backends) -> None:  # type: ignore[no-untyped-def]
    # Two sequences prefilled one by one (the prefill graph), then stepped together (the decoder).
    both, _, _ = backends
    cache = both.new_kv_cache(2, 64)
    for slot, offset in ((0, 0), (1, 7)):
        both.forward(cache, [slot], both.embed(PROMPT + offset)[None])
    blocks = [cache.read(slot) for slot in (0, 1)]
    together = both.forward(cache, [0, 1], both.embed(np.array([5, 6]))[:, None])
    for slot, token in ((0, 5), (1, 6)):
        alone = both.new_kv_cache(1, 64)
        alone.write(0, blocks[slot])
        step = both.embed(np.array([token]))[:, None]
        np.testing.assert_allclose(both.forward(alone, [0], step)[0], together[slot], rtol=1e-5, atol=1e-5)
    if isinstance(cache, SharedSlots):
        assert {role for role, _, _ in cache.bindings} == {"prefill", "decode"}


def test_the_prefill_graph_counts_in_the_models_bytes(backends, quantized_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    both, q4, _ = backends
    int8_file = quantized_model_dir / "onnx" / "decoder_model_merged_int8.onnx"
    assert both.info.model_bytes == q4.info.model_bytes + sum(p.stat().st_size for p in graph_files(int8_file))
    assert both.info.decoder_bytes == q4.info.decoder_bytes  # what a decode step reads
    assert set(both.info.precisions) == {"q4", "int8", "fp32"}


def test_the_decoders_own_precision_is_one_graph(quantized_model_dir: Path) -> None:
    backend = FastVLMModelManager.from_model_dir(quantized_model_dir, "q4", prefill_precision="q4").backend
    assert backend.prefill_precision == "q4" and backend.info.precisions == ("q4", "fp32")


def test_a_prefill_graph_that_cannot_share_the_kv_cache_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Beside the rewritten decoder (one KV buffer per layer, written in place), a graph that the
    # rewrites skip (optimum's If over two decoders) keeps its KV as separate past tensors.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    decoder = onnx.load(str(model_dir / "onnx" / "decoder_model_merged.onnx"))
    onnx.save(decoder_variants.cache_branch(decoder), str(model_dir / "onnx" / "decoder_model_merged_int8.onnx"))
    optimized = tmp_path / "ort-optimized"
    refused = r"the int8 decoder graph for prompts \(decoder_model_merged_int8.onnx\) does not share a KV cache"
    with pytest.raises(ModelFilesError, match=refused + " with the fp32 decoder"):
        FastVLMModelManager.from_model_dir(model_dir, prefill_precision="int8", optimized_graph_dir=optimized)
    # As exported, both keep separate past tensors: the same cache, and the If graph runs prompts.
    backend = FastVLMModelManager.from_model_dir(model_dir, prefill_precision="int8").backend
    assert backend.prefill_precision == "int8" and backend.fused_attention_layers == 0
    alone = FastVLMModelManager.from_model_dir(tiny_model_dir).backend
    prompt = backend.embed(PROMPT)[None]
    np.testing.assert_allclose(
        backend.forward(backend.new_kv_cache(1, 64), [0], prompt),
        alone.forward(alone.new_kv_cache(1, 64), [0], prompt),
        rtol=1e-5,
        atol=1e-5,
    )
