"""The abstract FastVLM runtime backend and the data it exchanges.

A backend turns pixels into image features and token ids (with those features spliced in)
into next-token logits, keeping a per-request KV cache. It knows nothing of prompts, images
as files, sampling or gRPC: the model manager drives it one step at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class VisionSpec:
    """Facts read from the vision encoder session."""

    image_size: int  # square input side, 0 when the graph leaves it dynamic
    image_tokens: int | None  # features per image, None when the graph leaves it dynamic
    feature_dim: int


@dataclass(frozen=True)
class DecoderSpec:
    """Facts read from the embedding and decoder sessions."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class BackendInfo:
    """What a backend reports about itself for capabilities and logs."""

    runtime: str  # e.g. "onnxrt-cpu"
    providers: tuple[str, ...]
    precision: str
    graph_precisions: dict[str, str] = field(default_factory=dict)
    load_time_ms: float = 0.0
    model_bytes: int = 0  # all three graphs, with their external data
    decoder_bytes: int = 0  # the weights every decode step reads


class DecoderState(ABC):
    """One request's decoding state: its KV cache and how many positions it holds."""

    length: int

    @property
    @abstractmethod
    def logits(self) -> np.ndarray:
        """float32 [vocab] logits for the next token after everything fed so far."""


class BaseFastVLMBackend(ABC):
    """The interface every FastVLM runtime implements."""

    @property
    @abstractmethod
    def info(self) -> BackendInfo: ...

    @property
    @abstractmethod
    def vision_spec(self) -> VisionSpec: ...

    @property
    @abstractmethod
    def decoder_spec(self) -> DecoderSpec: ...

    @abstractmethod
    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [1, 3, H, W] pixels -> [tokens, hidden] projected image features."""

    @abstractmethod
    def prefill(
        self,
        input_ids: np.ndarray,
        image_features: np.ndarray | None,
        image_token_id: int,
        image_key: str | None = None,
        reserve: int = 0,
    ) -> DecoderState:
        """Run the prompt through the decoder.

        `input_ids` is int64 [seq]; the positions holding `image_token_id` receive the rows of
        `image_features` in order (as transformers' masked_scatter does). `image_key`
        identifies the image's content: with it, a backend may reuse the KV cache of an
        identical prompt prefix up to the image from an earlier request. `reserve` is how
        many tokens are expected to follow, so the cache can be sized once (it still grows
        if more come).
        """

    @abstractmethod
    def decode_step(self, state: DecoderState, token_id: int) -> np.ndarray:
        """Feed one token, extend the cache, return float32 [vocab] logits."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release runtime resources."""
