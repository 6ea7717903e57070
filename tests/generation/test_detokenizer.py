"""IncrementalDetokenizer against a full decode, on a byte-level BPE that splits non-ASCII text."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lumen_vlm.generation import IncrementalDetokenizer

SPECIAL = "<|im_end|>"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture of a cat sitting on a red sofa, next to a window.",
    "Describe the image in detail. There are two people and a dog in the park.",
    "numbers 0123456789 and punctuation !?;:,.'\"()[]{}",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # ASCII-only training data: every non-ASCII character stays split into several byte tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[SPECIAL],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detok.push(token_id) for token_id in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    assert detok.token_count == len(ids)
    return deltas


TEXTS = [
    "Hello, world!",
    "一只猫坐在红色的沙发上。",
    "猫が窓のそばに座っています。",
    "A cat 🐱 and a dog 🐶 in the park.",
    "Family: 👩‍👩‍👧 and flags 🇯🇵🇨🇳",
    "Mixed: the 猫 is on the ソファ, très bien — ok 👍🏽.",
    "é (e + combining acute: é)",
]


def test_non_ascii_characters_are_split_into_several_tokens(tokenizer: Tokenizer) -> None:
    # Guards the premise of the other tests: the tokenizer really produces partial UTF-8 tokens.
    assert len(tokenizer.encode("猫").ids) == 3
    assert len(tokenizer.encode("👩‍👩‍👧").ids) > 5


@pytest.mark.parametrize("text", TEXTS)
def test_joined_deltas_equal_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_no_delta_contains_a_replacement_character(tokenizer: Tokenizer, text: str) -> None:
    deltas = stream(tokenizer, tokenizer.encode(text).ids)
    assert all("\ufffd" not in delta for delta in deltas)


def test_multibyte_character_is_emitted_once_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("猫").ids
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(token_id) for token_id in ids] == ["", "", "猫"]
    assert detok.flush() == ""


def test_special_token_skipped_or_kept(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode("猫 ok").ids, tokenizer.token_to_id(SPECIAL)]
    assert "".join(stream(tokenizer, ids)) == "猫 ok"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)) == "猫 ok" + SPECIAL


def test_incomplete_tail_is_released_on_flush_as_replacement(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 猫").ids[:-1]  # drop the last byte of the character
    detok = IncrementalDetokenizer(tokenizer)
    pushed = "".join(detok.push(token_id) for token_id in ids)
    assert pushed == "ok "
    tail = detok.flush()
    assert pushed + tail == tokenizer.decode(ids)
    assert tail.endswith("\ufffd")


def test_push_after_flush_is_rejected(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    detok.flush()
    with pytest.raises(RuntimeError):
        detok.push(0)


ALPHABET = list("abc xyz.,!\n") + list("猫犬の日本語中文") + ["é", "\u0301", "🐱", "👍🏽", "\u200d", "👩", "🇯"]


def test_random_strings_round_trip(tokenizer: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choices(ALPHABET, k=rng.randint(0, 40)))
        ids = tokenizer.encode(text).ids
        deltas = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids) == text
        assert all("\ufffd" not in delta for delta in deltas)


def test_random_token_ids_match_full_decode(tokenizer: Tokenizer) -> None:
    # Arbitrary ids include stray continuation bytes that never form a character; the stream
    # must still reproduce the lossy full decode, U+FFFD included.
    rng = random.Random(99)
    vocab = tokenizer.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))]
        for skip in (True, False):
            assert "".join(stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)
