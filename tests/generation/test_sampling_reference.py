"""Our numpy filters against transformers' logits processors, on the same float32 logits."""

from __future__ import annotations

import numpy as np
import pytest

from lumen_vlm.generation import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    process_logits,
    top_k_filter,
    top_p_filter,
)
from tools.make_test_model import import_reference_stack

from ..conftest import skip_module_without_reference_stack

pytestmark = pytest.mark.reference

skip_module_without_reference_stack()
import_reference_stack()
import torch  # noqa: E402
from transformers.generation import logits_process  # noqa: E402

VOCAB = 1000
SEEDS = [0, 1, 2, 3]


def make_logits(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, VOCAB).astype(np.float32)
    # Ties (including across the top-k boundary) and a block of negative scores.
    logits[rng.choice(VOCAB, 40, replace=False)] = logits[np.argsort(logits)[-5]]
    logits[:50] = -np.abs(logits[:50])
    return logits


def make_history(seed: int) -> np.ndarray:
    # Prompt plus generated ids, with repeats, as one sequence, like transformers' input_ids.
    return np.random.default_rng(seed + 100).integers(0, VOCAB, 120)


def reference(processors: list, logits: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
    input_ids = torch.from_numpy(np.zeros(1, np.int64) if history is None else history).unsqueeze(0)
    scores = torch.from_numpy(logits).unsqueeze(0)
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores[0].numpy()


def assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    finite = np.isfinite(theirs)
    assert finite.any()
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=0, atol=1e-6)


def assert_same_up_to_tie_order(ours: np.ndarray, theirs: np.ndarray) -> None:
    """For top-p: among equal logits, which ones survive depends on torch's unstable sort.

    The sorted values (hence the cumulative probabilities and the number kept) do not depend on
    that order, so the kept values must agree as a multiset and wherever both keep a token.
    """
    both = np.isfinite(ours) & np.isfinite(theirs)
    np.testing.assert_allclose(ours[both], theirs[both], rtol=0, atol=1e-6)
    kept_ours, kept_theirs = np.sort(ours[np.isfinite(ours)]), np.sort(theirs[np.isfinite(theirs)])
    np.testing.assert_allclose(kept_ours, kept_theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.8, 1.1, 1.5, 3.0])
def test_repetition_penalty_matches(seed: int, penalty: float) -> None:
    logits, history = make_logits(seed), make_history(seed)
    ours = apply_repetition_penalty(logits, history, penalty)
    theirs = reference([logits_process.RepetitionPenaltyLogitsProcessor(penalty)], logits, history)
    assert_same(ours, theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.8])
def test_temperature_matches(seed: int, temperature: float) -> None:
    logits = make_logits(seed)
    theirs = reference([logits_process.TemperatureLogitsWarper(temperature)], logits)
    assert_same(apply_temperature(logits, temperature), theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 5, 10, 50, 999, 1000, 5000])
def test_top_k_matches(seed: int, k: int) -> None:
    logits = make_logits(seed)
    theirs = reference([logits_process.TopKLogitsWarper(k)], logits)
    assert_same(top_k_filter(logits, k), theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [1e-4, 0.1, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_top_p_matches_exactly_without_ties(seed: int, p: float) -> None:
    logits = np.random.default_rng(seed).normal(0, 4, VOCAB).astype(np.float32)
    logits[:50] = -np.abs(logits[:50])
    assert np.unique(logits).size == VOCAB
    theirs = reference([logits_process.TopPLogitsWarper(p)], logits)
    assert_same(top_p_filter(logits, p), theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [1e-4, 0.1, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_top_p_matches_with_ties(seed: int, p: float) -> None:
    logits = make_logits(seed)
    theirs = reference([logits_process.TopPLogitsWarper(p)], logits)
    assert_same_up_to_tie_order(top_p_filter(logits, p), theirs)


def test_top_k_ties_are_exercised() -> None:
    # The fixture really puts ties on the top-k boundary, so the tie rule is being compared above.
    logits = make_logits(0)
    assert np.isfinite(top_k_filter(logits, 5)).sum() > 5


CHAINS = [
    SamplingParams(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1),
    SamplingParams(temperature=1.3, top_k=0, top_p=0.8, repetition_penalty=1.3),
    SamplingParams(temperature=0.5, top_k=20, top_p=1.0, repetition_penalty=1.0),
    SamplingParams(temperature=1.0, top_k=5, top_p=0.5, repetition_penalty=0.9),
]


def reference_chain(params: SamplingParams) -> list:
    # Built the way transformers' generate() does: penalty first, then temperature, top-k, top-p,
    # each only when it is not a no-op.
    processors: list = []
    if params.repetition_penalty != 1.0:
        processors.append(logits_process.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature != 1.0:
        processors.append(logits_process.TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        processors.append(logits_process.TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(logits_process.TopPLogitsWarper(params.top_p))
    return processors


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("params", CHAINS)
def test_combined_chain_matches(seed: int, params: SamplingParams) -> None:
    logits, history = make_logits(seed), make_history(seed)
    theirs = reference(reference_chain(params), logits, history)
    ours = process_logits(logits, history, params)
    if params.top_p < 1.0:
        assert_same_up_to_tie_order(ours, theirs)
    else:
        assert_same(ours, theirs)


@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_top_p_matches_on_full_qwen_vocab(p: float) -> None:
    # 151936 tokens: large enough that only a partitioned head of the vocabulary gets sorted.
    logits = np.random.default_rng(7).normal(0, 3, 151936).astype(np.float32)
    theirs = reference([logits_process.TopPLogitsWarper(p)], logits)
    assert_same_up_to_tie_order(top_p_filter(logits, p), theirs)
