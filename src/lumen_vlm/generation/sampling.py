"""Next-token selection on a 1-D logits vector, following transformers' logits processors.

Every filter is a pure function that returns a new array; filtered entries become ``-inf``.
The order used by :class:`TokenSampler` (repetition penalty, then temperature -> top-k -> top-p)
is the order in which transformers' ``generate`` applies its processors, so a model served here
samples from the same distribution as the reference implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SamplingParams",
    "TokenSampler",
    "apply_repetition_penalty",
    "apply_temperature",
    "process_logits",
    "top_k_filter",
    "top_p_filter",
]


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one request. ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _as_float_vector(logits: np.ndarray) -> np.ndarray:
    # Floating inputs keep their dtype so float32 results match transformers bit for bit.
    array = np.asarray(logits)
    if array.ndim != 1:
        raise ValueError(f"logits must be a 1-D vector, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    return array


def apply_repetition_penalty(
    logits: np.ndarray, previous_token_ids: Sequence[int] | np.ndarray, penalty: float
) -> np.ndarray:
    """Penalise every distinct token already in the sequence (prompt and generated ids alike).

    A negative score is multiplied by ``penalty`` and a non-negative one divided by it, so a
    penalty > 1 always makes the token less likely. Ids outside the vocabulary are ignored, as
    transformers does when the embedding table is larger than the LM head.
    """
    scores = _as_float_vector(logits)
    ids = np.unique(np.asarray(previous_token_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < scores.shape[0])]
    out = scores.copy()
    seen = scores[ids]
    out[ids] = np.where(seen < 0, seen * penalty, seen / penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    scores = _as_float_vector(logits)
    return scores / scores.dtype.type(temperature)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the tokens whose logit is >= the k-th largest (ties at the boundary all survive)."""
    if k < 0:
        raise ValueError(f"top_k must be >= 0, got {k}")
    scores = _as_float_vector(logits)
    if k == 0 or k >= scores.shape[0]:
        return scores.copy()
    # np.partition is O(vocab); only the k-th largest value is needed, not a full sort.
    kth_largest = np.partition(scores, -k)[-k]
    return np.where(scores < kth_largest, -np.inf, scores).astype(scores.dtype, copy=False)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering: drop the least likely tokens whose cumulative probability is <= 1 - p.

    The most likely token is always kept (transformers' ``min_tokens_to_keep=1``). Which of several
    equal logits at the boundary survives is unspecified, as it is with torch's unstable sort.
    """
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    scores = _as_float_vector(logits)
    # -inf entries have zero probability and sort first, so they are removed anyway: skip them.
    candidates = np.flatnonzero(scores > -np.inf)
    if p == 1 or candidates.size == 0:
        return scores.copy()
    probs = _softmax(scores[candidates].astype(np.float64))
    head, tail_mass = _nucleus_head(probs, p)
    order = head[np.argsort(probs[head], kind="stable")]
    cumulative = tail_mass + np.cumsum(probs[order])
    remove = cumulative <= 1 - p
    remove[-1] = False
    kept = candidates[order[~remove]]
    out = np.full_like(scores, -np.inf)
    out[kept] = scores[kept]
    return out


def _nucleus_head(probs: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """Indices of the most likely tokens, enough that every other token is surely removed.

    Sorting 150k probabilities costs ~10 ms a step; a partition that isolates a few hundred top
    tokens is O(vocab). Tokens outside the head are removed when their whole mass is <= 1 - p,
    because each one's ascending cumulative probability is at most that mass.
    """
    size = 256
    while size < probs.size:
        partition = np.argpartition(probs, probs.size - size)
        tail, head = partition[: probs.size - size], partition[probs.size - size :]
        tail_mass = float(probs[tail].sum())
        if tail_mass <= 1 - p:
            return head, tail_mass
        size *= 4
    return np.arange(probs.size), 0.0


def process_logits(
    logits: np.ndarray, previous_token_ids: Sequence[int] | np.ndarray, params: SamplingParams
) -> np.ndarray:
    """The full processor chain; the result is the distribution a sampler draws from (pre-softmax)."""
    scores = _as_float_vector(logits)
    if params.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, previous_token_ids, params.repetition_penalty)
    if params.greedy:
        return scores
    scores = apply_temperature(scores, params.temperature)
    scores = top_k_filter(scores, params.top_k)
    return top_p_filter(scores, params.top_p)


def _softmax(scores: np.ndarray) -> np.ndarray:
    peak = scores.max()
    if np.isnan(peak) or peak == -np.inf:
        raise ValueError("logits contain no finite value to sample from")
    # A tiny temperature can overflow to +inf; the limit of softmax is uniform over those entries.
    weights = (scores == np.inf).astype(np.float64) if peak == np.inf else np.exp(scores - peak)
    return weights / weights.sum()


class TokenSampler:
    """Picks the next token for one sequence, with its own random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        # A private generator keeps requests reproducible and independent of global random state.
        self._rng = np.random.default_rng(params.seed)

    def next_token(self, logits: np.ndarray, previous_token_ids: Sequence[int] | np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(process_logits(logits, previous_token_ids, self.params)))
        # float64 before scaling, so a small temperature does not overflow float32 logits.
        scores = process_logits(_as_float_vector(logits).astype(np.float64), previous_token_ids, self.params)
        return self._draw(scores)

    def _draw(self, scores: np.ndarray) -> int:
        # Inverse-CDF over the surviving tokens only; after top-k/top-p that is a short vector.
        candidates = np.flatnonzero(scores > -np.inf)
        if candidates.size == 0:
            raise ValueError("logits contain no finite value to sample from")
        cdf = np.cumsum(_softmax(scores[candidates]))
        position = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(candidates[min(position, candidates.size - 1)])
