"""The abstract FastVLM runtime backend and the data it exchanges.

A backend is the runtime: pixels -> image features, token ids -> embeddings, and embeddings
-> next-token logits for a batch of sequences, each in a slot of its KV cache. It knows
nothing of prompts, images as files, sampling, scheduling or transports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..resources.model_spec import GraphSpec
from .kv_cache import KVCache


@dataclass(frozen=True)
class BackendInfo:
    """What a backend reports about itself for capabilities and logs."""

    runtime: str  # e.g. "onnxrt-cpu"
    providers: tuple[str, ...]
    precision: str  # the decoder's: most of the model's weight and time
    precisions: tuple[str, ...] = ()  # every precision a graph was loaded in, the decoder's first
    load_time_ms: float = 0.0
    model_bytes: int = 0  # every graph loaded (a prompt decoder too), with their external data
    decoder_bytes: int = 0  # the weights every decode step reads


class BaseFastVLMBackend(ABC):
    """The interface every FastVLM runtime implements."""

    @property
    @abstractmethod
    def info(self) -> BackendInfo: ...

    @property
    @abstractmethod
    def graph_spec(self) -> GraphSpec:
        """The graphs' part of the model spec, read from their inputs and outputs."""

    @abstractmethod
    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [1, 3, H, W] pixels -> [tokens, hidden] projected image features."""

    @abstractmethod
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """int64 [n] token ids -> [n, hidden] embeddings, in the decoder's input type."""

    @abstractmethod
    def new_kv_cache(self, slots: int, slot_tokens: int) -> KVCache:
        """A KV cache of `slots` slots holding `slot_tokens` positions each."""

    @abstractmethod
    def forward(self, cache: KVCache, slots: Sequence[int], embeds: np.ndarray) -> np.ndarray:
        """Append `embeds` [rows, n, hidden] to the sequences in `slots` (one row each; n is 1
        when there are several rows) and return float32 [rows, vocab] next-token logits.

        BackendInputError when a slot has no room for the new positions."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release runtime resources."""
