"""The runtime's KV cache for a batch: the fused decoder's shared slots, written in place, give
the graph-as-exported's logits, row by row, whatever the other slots hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lumen_vlm.backends.backend_exceptions import BackendInputError
from lumen_vlm.backends.kv_cache import SeparateSlots, SharedSlots
from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager


def test_a_batched_step_on_shared_slots_equals_each_sequence_run_alone(tmp_path: Path, tiny_model_dir: Path) -> None:
    fused = FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=tmp_path).backend
    plain = FastVLMModelManager.from_model_dir(tiny_model_dir).backend
    assert fused.fused_attention_layers > 0 and plain.fused_attention_layers == 0
    shared, separate = fused.new_kv_cache(3, 64), plain.new_kv_cache(3, 64)
    assert isinstance(shared, SharedSlots) and isinstance(separate, SeparateSlots)
    prompts = {0: np.arange(10, 40), 2: np.arange(100, 107), 1: np.arange(500, 519)}  # three lengths
    tokens = {}
    for slot, ids in prompts.items():
        got = fused.forward(shared, [slot], fused.embed(ids)[None])
        want = plain.forward(separate, [slot], plain.embed(ids)[None])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        tokens[slot] = int(np.argmax(want[0]))
    # Slots in any order, and a subset that leaves a slot out of the batch: each row's keys
    # and values must land in its own slot for the next steps' logits to match.
    for order in ([2, 0, 1], [0, 2], [1, 0, 2], [2, 1]):
        ids = np.array([tokens[slot] for slot in order])
        got = fused.forward(shared, order, fused.embed(ids)[:, None])
        want = plain.forward(separate, order, plain.embed(ids)[:, None])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        tokens.update({slot: int(np.argmax(row)) for slot, row in zip(order, want, strict=True)})
    assert shared.lengths == separate.lengths == [30 + 3, 19 + 3, 7 + 4]


def test_a_released_slot_starts_over_and_a_block_moves_between_slots(tmp_path: Path, tiny_model_dir: Path) -> None:
    backend = FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=tmp_path).backend
    cache = backend.new_kv_cache(2, 32)
    ids = np.arange(10, 30)
    first = backend.forward(cache, [0], backend.embed(ids)[None])
    block = cache.read(0)
    assert block.length == 20
    cache.write(1, block)  # the prefix cache hands a prompt's KV into another slot
    cache.release(0)
    assert cache.lengths == [0, 20]
    np.testing.assert_array_equal(backend.forward(cache, [0], backend.embed(ids)[None]), first)
    step = backend.embed(np.array([7, 7]))[:, None]
    both = backend.forward(cache, [0, 1], step)
    np.testing.assert_array_equal(both[0], both[1])


def test_a_full_slot_is_an_input_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    backend = FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=tmp_path).backend
    cache = backend.new_kv_cache(2, 12)
    backend.forward(cache, [1], backend.embed(np.arange(10, 21))[None])
    backend.forward(cache, [1], backend.embed(np.array([11]))[:, None])  # the slot's last position
    with pytest.raises(BackendInputError, match="the KV slot holds 12 tokens; 12 are used and 1 more do not fit"):
        backend.forward(cache, [0, 1], backend.embed(np.array([11, 12]))[:, None])
    assert cache.lengths == [0, 12], "a refused step changes nothing"


def test_a_slot_costs_what_its_layers_keys_and_values_take(tmp_path: Path, tiny_model_dir: Path) -> None:
    for manager in (
        FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=tmp_path),
        FastVLMModelManager.from_model_dir(tiny_model_dir),
    ):
        spec = manager.spec.decoder
        cache = manager.new_kv_cache(2, 100)
        # Keys and values (2) of every layer, float32 (4 bytes), for each position.
        assert cache.token_bytes == spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
        assert cache.slot_bytes == 100 * cache.token_bytes
        if isinstance(cache, SharedSlots):
            assert sum(buffer.nbytes for buffer in cache.buffers) == 2 * cache.slot_bytes


def test_a_row_range_is_bound_once_and_its_binding_reused(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The KV buffers are bound to the runtime once per row range of a cache; the steps after
    reuse that binding, and give exactly the logits of binding them afresh."""
    backend = FastVLMModelManager.from_model_dir(tiny_model_dir, optimized_graph_dir=tmp_path).backend
    kept, fresh = backend.new_kv_cache(2, 32), backend.new_kv_cache(2, 32)
    assert isinstance(kept, SharedSlots) and isinstance(fresh, SharedSlots)
    prompt = backend.embed(np.arange(10, 30))[None]
    np.testing.assert_array_equal(backend.forward(kept, [1], prompt), backend.forward(fresh, [1], prompt))
    binding = kept.bindings[("decode", 1, 1)]
    for token in (5, 6, 7):
        step = backend.embed(np.array([token]))[:, None]
        fresh.bindings.clear()  # bound anew for this step
        np.testing.assert_array_equal(backend.forward(kept, [1], step), backend.forward(fresh, [1], step))
    assert kept.bindings == {("decode", 1, 1): binding}
    backend.forward(kept, [0, 1], backend.embed(np.array([3, 4]))[:, None])
    assert set(kept.bindings) == {("decode", 1, 1), ("decode", 0, 2)}  # rows 0..1 together: a range of its own
