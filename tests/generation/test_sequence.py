"""SequenceText on the tiny model's byte-level tokenizer: every stop rule and what each one releases."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from lumen_vlm.generation import FinishReason, SequenceText
from lumen_vlm.resources.model_files import locate_model_files, read_file_spec
from lumen_vlm.resources.model_spec import TextSpec

from ..conftest import TINY_MODEL

CAT = "猫"  # three byte tokens in this tokenizer: a prefix of them decodes to U+FFFD
TEXTS = [
    "Hello, world! The answer is 4 </answer>",
    "a cat on a sofa.\n\nNext",
    "一只猫 🐱 on a sofa, 猫が窓のそばに座っています。",
    "Family: 👩‍👩‍👧 and flags 🇯🇵🇨🇳 done",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TINY_MODEL / "tokenizer.json"))


@pytest.fixture(scope="module")
def model_text(tokenizer: Tokenizer) -> TextSpec:
    return read_file_spec(locate_model_files(TINY_MODEL), tokenizer.token_to_id).text


@pytest.fixture(scope="module")
def eos(model_text: TextSpec) -> int:
    return min(model_text.eos_token_ids)


def new_sequence(
    tokenizer: Tokenizer, model_text: TextSpec, max_new_tokens: int = 1000, stops: tuple[str, ...] = ()
) -> SequenceText:
    return SequenceText(tokenizer, model_text.eos_token_ids, max_new_tokens, stops)


def push_all(sequence: SequenceText, ids: list[int]) -> list[str]:
    """Push until the sequence finishes (or the ids run out); the deltas, one per pushed token."""
    deltas = []
    for token_id in ids:
        deltas.append(sequence.push(token_id))
        if sequence.finish_reason is not None:
            break
    assert sequence.text == "".join(deltas)
    assert sequence.token_ids == tuple(ids[: len(deltas)])
    assert sequence.generated_tokens == len(deltas)
    return deltas


def test_the_tokenizer_splits_a_character_over_tokens(tokenizer: Tokenizer) -> None:
    # The premise of the mid-character tests below.
    ids = tokenizer.encode(CAT).ids
    assert len(ids) == 3
    assert tokenizer.decode(ids[:2]) == "\ufffd"


def test_eos_finishes_without_text_and_releases_a_held_back_stop_prefix(
    tokenizer: Tokenizer, model_text: TextSpec, eos: int
) -> None:
    ids = tokenizer.encode("The answer is </").ids
    sequence = new_sequence(tokenizer, model_text, stops=("</answer>",))
    deltas = push_all(sequence, ids)
    assert sequence.finish_reason is None
    assert sequence.text == "The answer is "  # "</" could still become the stop string
    assert sequence.push(eos) == "</"
    assert sequence.finish_reason is FinishReason.EOS
    assert sequence.text == "".join([*deltas, "</"]) == "The answer is </"
    assert sequence.token_ids == (*ids, eos)
    assert sequence.generated_tokens == len(ids) + 1


def test_eos_releases_an_unfinished_character(tokenizer: Tokenizer, model_text: TextSpec, eos: int) -> None:
    ids = tokenizer.encode(f"a cat {CAT}").ids[:-1]  # the last byte of the character never comes
    sequence = new_sequence(tokenizer, model_text)
    push_all(sequence, ids)
    assert sequence.text == "a cat "
    assert sequence.push(eos) == "\ufffd"
    assert sequence.finish_reason is FinishReason.EOS
    assert sequence.text == tokenizer.decode(ids) == "a cat \ufffd"


def test_every_eos_id_of_the_model_finishes(tokenizer: Tokenizer, model_text: TextSpec) -> None:
    assert len(model_text.eos_token_ids) >= 2  # the tiny model lists two, as FastVLM does
    for eos_id in model_text.eos_token_ids:
        sequence = new_sequence(tokenizer, model_text)
        assert sequence.push(eos_id) == ""
        assert (sequence.finish_reason, sequence.token_ids, sequence.text) == (FinishReason.EOS, (eos_id,), "")


def test_another_special_token_adds_no_text_and_does_not_finish(tokenizer: Tokenizer, model_text: TextSpec) -> None:
    im_start = tokenizer.token_to_id("<|im_start|>")
    assert im_start not in model_text.eos_token_ids
    sequence = new_sequence(tokenizer, model_text)
    assert sequence.push(im_start) == ""
    assert sequence.finish_reason is None


def test_length_mid_character_releases_it_as_a_replacement_character(
    tokenizer: Tokenizer, model_text: TextSpec
) -> None:
    ids = tokenizer.encode(f"a cat {CAT}").ids
    limit = len(ids) - 1  # the limit falls between the character's second and third byte
    sequence = new_sequence(tokenizer, model_text, max_new_tokens=limit)
    deltas = push_all(sequence, ids)
    assert len(deltas) == limit
    assert deltas[-1] == "\ufffd"
    assert sequence.finish_reason is FinishReason.LENGTH
    assert sequence.text == tokenizer.decode(ids[:limit]) == "a cat \ufffd"


def test_length_mid_possible_stop_releases_the_held_back_text(tokenizer: Tokenizer, model_text: TextSpec) -> None:
    ids = tokenizer.encode("The answer is </answer>").ids
    prefix_ids = tokenizer.encode("The answer is </").ids
    assert ids[: len(prefix_ids)] == prefix_ids
    sequence = new_sequence(tokenizer, model_text, max_new_tokens=len(prefix_ids), stops=("</answer>",))
    deltas = push_all(sequence, ids)
    assert sequence.finish_reason is FinishReason.LENGTH
    assert deltas[-1] == "</"  # the last token's "/" and the "<" held back before it
    assert sequence.text == "The answer is </"


def test_the_limit_counts_every_token_and_eos_on_the_last_one_is_eos(
    tokenizer: Tokenizer, model_text: TextSpec, eos: int
) -> None:
    ids = tokenizer.encode("Hello, world!").ids
    sequence = new_sequence(tokenizer, model_text, max_new_tokens=len(ids) + 1)
    push_all(sequence, [*ids, eos])
    assert (sequence.finish_reason, sequence.generated_tokens) == (FinishReason.EOS, len(ids) + 1)


def test_stop_string_straddling_tokens_cuts_the_text_before_it(tokenizer: Tokenizer, model_text: TextSpec) -> None:
    ids = tokenizer.encode("Hello, world! The answer").ids
    tokens = [tokenizer.decode([t]) for t in ids]
    assert tokens[:5] == ["H", "el", "lo", ",", " world"]
    sequence = new_sequence(tokenizer, model_text, stops=("lo, w",))
    deltas = push_all(sequence, ids)
    assert sequence.finish_reason is FinishReason.STOP_SEQUENCE
    assert len(deltas) == 5  # finished by the token that completed the stop string
    assert deltas == ["H", "e", "l", "", ""]  # "l", then "lo", then "lo," could each start it
    assert sequence.text == "Hel"


def test_a_stop_string_on_the_last_allowed_token_is_stop_sequence(tokenizer: Tokenizer, model_text: TextSpec) -> None:
    ids = tokenizer.encode("Hello, world! The answer").ids
    sequence = new_sequence(tokenizer, model_text, max_new_tokens=5, stops=("lo, w",))
    push_all(sequence, ids)
    assert (sequence.finish_reason, sequence.text) == (FinishReason.STOP_SEQUENCE, "Hel")


@pytest.mark.parametrize("finish_by", ["length", "eos"])
def test_a_stop_string_completed_only_by_the_final_release_is_stop_sequence(
    tokenizer: Tokenizer, model_text: TextSpec, eos: int, finish_by: str
) -> None:
    # A stop string ending in U+FFFD: only releasing the unfinished character can complete it.
    ids = tokenizer.encode(f"a cat {CAT}").ids[:-2]
    stops = ("t \ufffd",)
    if finish_by == "length":
        sequence = new_sequence(tokenizer, model_text, max_new_tokens=len(ids), stops=stops)
        deltas = push_all(sequence, ids)
    else:
        sequence = new_sequence(tokenizer, model_text, stops=stops)
        deltas = push_all(sequence, [*ids, eos])
    assert sequence.finish_reason is FinishReason.STOP_SEQUENCE
    assert deltas[-1] == ""  # "t " was held back, and the release completed the stop string
    assert sequence.text == "a ca"


def test_joined_deltas_are_the_full_decode_for_every_limit(tokenizer: Tokenizer, model_text: TextSpec) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        for limit in range(1, len(ids) + 1):
            sequence = new_sequence(tokenizer, model_text, max_new_tokens=limit)
            push_all(sequence, ids)
            assert sequence.finish_reason is FinishReason.LENGTH
            assert sequence.text == tokenizer.decode(ids[:limit]), (text, limit)


def test_the_text_is_always_the_full_decode_cut_at_the_first_stop(
    tokenizer: Tokenizer, model_text: TextSpec, eos: int
) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        for start in range(0, len(text) - 2, 3):
            stop = text[start : start + 3]
            sequence = new_sequence(tokenizer, model_text, stops=(stop,))
            push_all(sequence, [*ids, eos])
            assert sequence.finish_reason is FinishReason.STOP_SEQUENCE, (text, stop)
            assert sequence.text == text[: text.find(stop)], (text, stop)
            assert stop not in sequence.text


@pytest.mark.parametrize(
    ("max_new_tokens", "stops", "tail", "reason"),
    [
        (1000, (), "eos", FinishReason.EOS),
        (3, (), "", FinishReason.LENGTH),
        (1000, ("lo",), "", FinishReason.STOP_SEQUENCE),
    ],
)
def test_push_after_finish_raises_and_changes_nothing(
    tokenizer: Tokenizer,
    model_text: TextSpec,
    eos: int,
    max_new_tokens: int,
    stops: tuple[str, ...],
    tail: str,
    reason: FinishReason,
) -> None:
    ids = tokenizer.encode("Hello, world!").ids + ([eos] if tail == "eos" else [])
    sequence = new_sequence(tokenizer, model_text, max_new_tokens=max_new_tokens, stops=stops)
    push_all(sequence, ids)
    assert sequence.finish_reason is reason
    before = (sequence.text, sequence.token_ids)
    with pytest.raises(RuntimeError, match=f"after the sequence finished \\({reason.value}\\)"):
        sequence.push(ids[0])
    assert (sequence.text, sequence.token_ids, sequence.finish_reason) == (*before, reason)


def test_bad_settings_are_refused_by_name(tokenizer: Tokenizer, model_text: TextSpec) -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        new_sequence(tokenizer, model_text, max_new_tokens=0)
    with pytest.raises(ValueError, match="stop sequences must be non-empty"):
        new_sequence(tokenizer, model_text, stops=("",))
