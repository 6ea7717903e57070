"""The on-disk cache of derived graphs: ORT's saved optimized vision and embedding graphs and the
rewritten decoder, on the tiny model, end to end through the runtime."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager
from lumen_vlm.graphs import OptimizedGraphCache, prepare_decoder
from lumen_vlm.resources.model_files import locate_model_files

from ..parity import assert_case_matches, prompt_logits


def test_saved_optimized_graphs_give_the_same_tokens(
    tmp_path: Path, tiny_model_dir: Path, golden: dict[str, Any]
) -> None:
    cache = tmp_path / "ort-optimized"
    first = FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=cache)
    saved = sorted(p.name for p in cache.glob("*/*"))
    # ORT's optimized vision and embedding graphs, and the decoder with last-position logits.
    assert saved.count("model.onnx") == 3 and saved.count("model.onnx.data") >= 1, saved
    assert first.backend.last_position_logits, "prefill computes the last position's logits only"
    assert first.backend.fused_attention_layers == first.backend.graph_spec.decoder.num_layers
    assert first.backend.fused_norms == 2 * first.backend.graph_spec.decoder.num_layers + 1
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
    sliced, reference = prompt_logits(q4.backend, ids), prompt_logits(full.backend, ids)
    assert np.abs(sliced - reference).max() < 1e-4
    # int8 (dynamic quantization): the projection is a MatMulInteger chain, left as it is;
    # its attention is still fused.
    int8 = FastVLMModelManager.from_model_dir(quantized_model_dir, precision="int8", optimized_graph_dir=cache)
    assert not int8.backend.last_position_logits
    assert int8.backend.fused_attention_layers == int8.backend.graph_spec.decoder.num_layers


def test_a_graph_no_rewrite_applies_to_is_remembered(
    tmp_path: Path, quantized_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # int8's logits cannot be sliced, and without a context length attention is not fused.
    cache = OptimizedGraphCache(tmp_path)
    source = locate_model_files(quantized_model_dir, "int8").graphs["decoder"]
    assert prepare_decoder(cache, source) is None
    assert len(list(tmp_path.glob("*/unsupported.txt"))) == 1
    # The finding is kept, so the (large) source is not parsed again at the next start.
    monkeypatch.setattr(onnx, "load", lambda *args, **kwargs: pytest.fail("the source was parsed again"))
    assert prepare_decoder(cache, source) is None


def test_a_rewritten_copy_that_does_not_load_is_remembered(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lumen_vlm.graphs import decoder as decoder_module

    def broken_copy(source: Path, target: Path, *args: Any) -> dict[str, Any]:
        target.write_bytes(b"not an onnx graph")
        return {"last_position_logits": True, "fused_attention_layers": 0, "fused_norms": 0}

    monkeypatch.setattr(decoder_module, "_write_rewritten", broken_copy)
    cache = OptimizedGraphCache(tmp_path)
    source = locate_model_files(tiny_model_dir).graphs["decoder"]
    assert prepare_decoder(cache, source, fuse_kernels=True, context_length=1024) is None
    assert [p.name for p in tmp_path.glob("*/*")] == ["unsupported.txt"]
    monkeypatch.setattr(decoder_module, "_write_rewritten", lambda *a: pytest.fail("rewritten again"))
    assert prepare_decoder(cache, source, fuse_kernels=True, context_length=1024) is None


def test_a_discarded_decoder_copy_is_made_again(tmp_path: Path, tiny_model_dir: Path) -> None:
    cache = OptimizedGraphCache(tmp_path)
    source = locate_model_files(tiny_model_dir).graphs["decoder"]
    derived = prepare_decoder(cache, source, fuse_kernels=True, context_length=1024)
    assert derived is not None and derived.last_position_logits and derived.fused_attention_layers > 0
    derived.discard("ORT could not open it")
    assert not derived.path.parent.exists()
    again = prepare_decoder(cache, source, fuse_kernels=True, context_length=1024)
    assert again == derived and again.path.is_file()


def test_a_start_that_finds_its_copies_saved_does_not_import_onnx(tmp_path: Path, tiny_model_dir: Path) -> None:
    # onnx takes about 1.5 s to import; only writing a copy needs it.
    cache = tmp_path / "ort-optimized"
    FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=cache)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager\n"
        f"manager = FastVLMModelManager.from_model_dir(Path({str(tiny_model_dir)!r}), "
        f"optimized_graph_dir=Path({str(cache)!r}))\n"
        "assert manager.backend.fused_attention_layers > 0, 'the saved copy is used'\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'onnx'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
