"""The decoder's KV cache for a batch: a fixed number of slots, one running sequence in each.

Two layouts behind one interface, chosen by the runtime from the decoder graph:

- `SharedSlots` (the fused GroupQueryAttention decoder): per layer one pre-allocated buffer
  of [slots, kv_heads, slot_tokens, head_dim]. The kernel appends in place at each row's own
  length (per-row ``seqlens_k``), so one decoder call serves every slot, and a sequence
  joining or leaving never copies another's cache.
- `SeparateSlots` (a decoder as exported, or a provider the fused kernel is not used on):
  each slot holds its own past tensors, replaced by the decoder's present outputs each step;
  the runtime runs such slots one after another (correct, not batched).

Slots are numbered 0..slots-1; a slot's `length` is how many positions it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class KVBlock:
    """A copy of the first `length` positions of one slot: per past tensor [1, kv_heads, length, head_dim]."""

    arrays: tuple[np.ndarray, ...]

    @property
    def length(self) -> int:
        return int(self.arrays[0].shape[2])

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays)


class KVCache:
    """What both layouts share: slot lengths, their capacity, and what a token costs."""

    def __init__(self, slots: int, slot_tokens: int, kv_heads: int, head_dim: int, tensors: int, dtype: type) -> None:
        self.slots = slots
        self.slot_tokens = slot_tokens
        self.lengths = [0] * slots
        # Keys and values of every layer for one position.
        self.token_bytes = kv_heads * head_dim * tensors * np.dtype(dtype).itemsize

    @property
    def slot_bytes(self) -> int:
        return self.token_bytes * self.slot_tokens

    def release(self, slot: int) -> None:
        """Empty a slot for the next sequence (its memory is reused, not freed)."""
        self.lengths[slot] = 0

    def room(self, slot: int) -> int:
        return self.slot_tokens - self.lengths[slot]

    def read(self, slot: int) -> KVBlock:  # pragma: no cover - interface
        raise NotImplementedError

    def write(self, slot: int, block: KVBlock) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class SharedSlots(KVCache):
    """One buffer per past tensor holding every slot; written in place by GroupQueryAttention."""

    def __init__(self, slots: int, slot_tokens: int, kv_heads: int, head_dim: int, tensors: int, dtype: type) -> None:
        super().__init__(slots, slot_tokens, kv_heads, head_dim, tensors, dtype)
        # np.zeros asks the OS for zeroed pages, which become resident only when written: a
        # budget that is never used costs address space, not memory.
        self.buffers = [np.zeros((slots, kv_heads, slot_tokens, head_dim), dtype=dtype) for _ in range(tensors)]
        # The runtime's bindings of these buffers, by (decoder graph, first row, rows), made by the
        # backend that runs on them (typed loosely so that this module needs no ORT import). They
        # hold raw pointers into `buffers`, so they live and die with this object.
        self.bindings: dict[tuple[str, int, int], Any] = {}

    def read(self, slot: int) -> KVBlock:
        length = self.lengths[slot]
        return KVBlock(tuple(buffer[slot : slot + 1, :, :length].copy() for buffer in self.buffers))

    def write(self, slot: int, block: KVBlock) -> None:
        for buffer, array in zip(self.buffers, block.arrays, strict=True):
            buffer[slot : slot + 1, :, : block.length] = array
        self.lengths[slot] = block.length


class SeparateSlots(KVCache):
    """Each slot's own past tensors (ORT values on the decoder's device), grown by each run."""

    def __init__(
        self, slots: int, slot_tokens: int, kv_heads: int, head_dim: int, tensors: int, dtype: type, device: str
    ) -> None:
        super().__init__(slots, slot_tokens, kv_heads, head_dim, tensors, dtype)
        self._shape = (1, kv_heads, 0, head_dim)
        self._tensors = tensors
        self._dtype = dtype
        self._device = device
        # ORT values, typed loosely so that this module needs no ORT import.
        self.past: list[list[Any]] = [self._empty() for _ in range(slots)]

    def _empty(self) -> list[Any]:
        return [self._value(np.zeros(self._shape, dtype=self._dtype)) for _ in range(self._tensors)]

    def _value(self, array: np.ndarray) -> Any:
        from .ort_runtime import ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device, 0)

    def release(self, slot: int) -> None:
        super().release(slot)
        self.past[slot] = self._empty()  # the old tensors go with their last reference

    def read(self, slot: int) -> KVBlock:
        return KVBlock(tuple(value.numpy().copy() for value in self.past[slot]))

    def write(self, slot: int, block: KVBlock) -> None:
        self.past[slot] = [self._value(array) for array in block.arrays]
        self.lengths[slot] = block.length


def rows_mask(lengths: Sequence[int], new_tokens: int, dtype: type) -> np.ndarray:
    """The attention mask for rows holding `lengths` positions each, `new_tokens` more each:
    ones over each row's positions, zeros after (the fused graph reads each row's length from it)."""
    totals = np.asarray(lengths, dtype=np.int64) + new_tokens
    return (np.arange(int(totals.max()))[None, :] < totals[:, None]).astype(dtype)


def rows_positions(lengths: Sequence[int], new_tokens: int, dtype: type) -> np.ndarray:
    """Each row's positions for its `new_tokens` new tokens, continuing from its length."""
    return (np.asarray(lengths, dtype=np.int64)[:, None] + np.arange(new_tokens)[None, :]).astype(dtype)
