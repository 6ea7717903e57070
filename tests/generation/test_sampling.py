from __future__ import annotations

import numpy as np
import pytest

from lumen_vlm.generation import (
    SamplingParams,
    TokenSampler,
    apply_repetition_penalty,
    apply_temperature,
    process_logits,
    top_k_filter,
    top_p_filter,
)


def random_logits(seed: int, vocab: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, vocab).astype(np.float32)


def draws(params: SamplingParams, logits: np.ndarray, n: int = 200) -> list[int]:
    sampler = TokenSampler(params)
    return [sampler.next_token(logits, []) for _ in range(n)]


def test_same_seed_gives_same_sequence() -> None:
    logits = random_logits(0)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first = draws(params, logits)
    assert first == draws(params, logits)
    assert len(set(first)) > 5  # actually random, not a constant stream


def test_different_seeds_differ() -> None:
    logits = random_logits(0)
    a = draws(SamplingParams(temperature=1.0, seed=1), logits)
    b = draws(SamplingParams(temperature=1.0, seed=2), logits)
    assert a != b


def test_sampler_does_not_touch_global_random_state() -> None:
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    draws(SamplingParams(temperature=1.0, seed=3), random_logits(1), n=10)
    assert np.random.random() == expected


@pytest.mark.parametrize("seed", [None, 0, 123])
def test_greedy_is_argmax_and_ignores_seed(seed: int | None) -> None:
    sampler = TokenSampler(SamplingParams(temperature=0.0, seed=seed))
    for logits_seed in range(20):
        logits = random_logits(logits_seed)
        assert sampler.next_token(logits, []) == int(np.argmax(logits))


def test_greedy_applies_repetition_penalty() -> None:
    logits = np.array([1.0, 5.0, 4.0], dtype=np.float32)
    sampler = TokenSampler(SamplingParams(repetition_penalty=2.0))
    assert sampler.next_token(logits, [1]) == 2  # 5 / 2 < 4


def test_top_k_one_always_picks_argmax() -> None:
    logits = random_logits(5)
    assert set(draws(SamplingParams(temperature=5.0, top_k=1, seed=0), logits)) == {int(np.argmax(logits))}


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = random_logits(6)
    filtered = top_p_filter(logits, 1e-6)
    assert np.flatnonzero(np.isfinite(filtered)).tolist() == [int(np.argmax(logits))]
    assert set(draws(SamplingParams(temperature=3.0, top_p=1e-6, seed=0), logits)) == {int(np.argmax(logits))}


def test_top_k_keeps_ties_at_the_boundary() -> None:
    logits = np.array([3.0, 1.0, 2.0, 2.0, 0.0])
    filtered = top_k_filter(logits, 2)
    assert np.isfinite(filtered).tolist() == [True, False, True, True, False]


def test_top_k_zero_or_larger_than_vocab_keeps_everything() -> None:
    logits = random_logits(2, vocab=10)
    np.testing.assert_array_equal(top_k_filter(logits, 0), logits)
    np.testing.assert_array_equal(top_k_filter(logits, 50), logits)


def test_repetition_penalty_signs_and_duplicates() -> None:
    logits = np.array([2.0, -2.0, 4.0, 0.0])
    out = apply_repetition_penalty(logits, np.array([0, 1, 1, 3, 0, 99]), 2.0)
    # Repeated ids are penalised once; ids beyond the vocabulary are ignored.
    np.testing.assert_array_equal(out, [1.0, -4.0, 4.0, 0.0])


def test_filters_never_mutate_input() -> None:
    logits = random_logits(3)
    original = logits.copy()
    apply_repetition_penalty(logits, [1, 2, 3], 1.3)
    apply_temperature(logits, 0.7)
    top_k_filter(logits, 10)
    top_p_filter(logits, 0.5)
    process_logits(logits, [4, 5], SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2))
    TokenSampler(SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.2, seed=0)).next_token(logits, [4, 5])
    np.testing.assert_array_equal(logits, original)


def test_filters_keep_float32() -> None:
    logits = random_logits(4)
    for out in (apply_temperature(logits, 0.5), top_k_filter(logits, 5), top_p_filter(logits, 0.5)):
        assert out.dtype == np.float32


def test_tiny_temperature_does_not_overflow_into_nan() -> None:
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    sampler = TokenSampler(SamplingParams(temperature=1e-300, seed=0))
    assert {sampler.next_token(logits, []) for _ in range(20)} == {1}


def test_rejects_non_vector_logits() -> None:
    with pytest.raises(ValueError, match="1-D"):
        TokenSampler(SamplingParams()).next_token(np.zeros((2, 3)), [])


def test_temperature_sampling_follows_softmax() -> None:
    logits = np.array([2.0, 1.0, 0.5, -1.0])
    temperature = 0.8
    expected = np.exp(logits / temperature)
    expected /= expected.sum()
    sampler = TokenSampler(SamplingParams(temperature=temperature, seed=2024))
    n = 20_000
    counts = np.bincount([sampler.next_token(logits, []) for _ in range(n)], minlength=4)
    # Standard error per bin is at most 0.0036; 0.015 is over four of them.
    np.testing.assert_allclose(counts / n, expected, atol=0.015)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ],
)
def test_invalid_params_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_greedy_property() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
