from __future__ import annotations

import pytest

from lumen_vlm.generation import FinishReason, StopSequenceFilter, clamp_max_new_tokens


def run(stops: list[str], deltas: list[str]) -> tuple[list[str], bool, str]:
    stop_filter = StopSequenceFilter(stops)
    emitted: list[str] = []
    stopped = False
    for delta in deltas:
        text, stopped = stop_filter.feed(delta)
        emitted.append(text)
        if stopped:
            break
    return emitted, stopped, stop_filter.flush()


def test_stop_sequence_spanning_several_deltas() -> None:
    emitted, stopped, tail = run(["lo w"], ["Hel", "lo wo", "rld"])
    assert stopped
    assert "".join(emitted) == "Hel"
    assert emitted[0] == "He"  # the trailing "l" could start "lo w", so it waits
    assert tail == ""


def test_stop_at_the_very_start() -> None:
    emitted, stopped, _ = run(["###"], ["##", "# more"])
    assert stopped
    assert "".join(emitted) == ""


def test_earliest_occurrence_wins() -> None:
    emitted, stopped, _ = run(["END", "stop", "x"], ["one two stop three END x"])
    assert (emitted, stopped) == (["one two "], True)


def test_shorter_later_listed_stop_that_occurs_first_wins() -> None:
    emitted, stopped, _ = run(["world", "o w"], ["hell", "o world"])
    assert stopped
    assert "".join(emitted) == "hell"


def test_hold_back_released_on_flush_when_no_stop_follows() -> None:
    emitted, stopped, tail = run(["</answer>"], ["The answer is 4 </ans"])
    assert not stopped
    assert emitted == ["The answer is 4 "]
    assert tail == "</ans"


def test_partial_prefix_then_diverge() -> None:
    stop_filter = StopSequenceFilter(["abd"])
    assert stop_filter.feed("ab") == ("", False)
    assert stop_filter.feed("c") == ("abc", False)
    assert stop_filter.flush() == ""


def test_feed_after_stop_returns_nothing() -> None:
    stop_filter = StopSequenceFilter(["\n\n"])
    assert stop_filter.feed("a\n\nb") == ("a", True)
    assert stop_filter.feed("more text") == ("", True)
    assert stop_filter.flush() == ""


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_emitted_text_never_contains_part_of_the_stop(chunk: int) -> None:
    text = "alpha <|end|> omega"
    deltas = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    emitted, stopped, tail = run(["<|end|>"], deltas)
    assert stopped
    assert "".join(emitted) + tail == "alpha "


def test_duplicates_allowed_and_empty_rejected() -> None:
    assert StopSequenceFilter(["x", "x"]).feed("axb") == ("a", True)
    with pytest.raises(ValueError, match="non-empty"):
        StopSequenceFilter(["ok", ""])


def test_no_stop_sequences_passes_everything_through() -> None:
    assert StopSequenceFilter([]).feed("anything") == ("anything", False)


def test_finish_reason_wire_values() -> None:
    assert FinishReason.EOS == "eos_token"
    assert FinishReason.LENGTH.value == "length"
    assert FinishReason("stop_sequence") is FinishReason.STOP_SEQUENCE


@pytest.mark.parametrize(
    ("requested", "prompt", "context", "expected"),
    [(100, 10, 2048, 100), (5000, 48, 2048, 2000), (1, 2047, 2048, 1), (2000, 48, 2048, 2000)],
)
def test_clamp_max_new_tokens(requested: int, prompt: int, context: int, expected: int) -> None:
    assert clamp_max_new_tokens(requested, prompt, context) == expected


@pytest.mark.parametrize("prompt", [2048, 3000])
def test_clamp_rejects_prompt_that_fills_the_context(prompt: int) -> None:
    with pytest.raises(ValueError, match="no room"):
        clamp_max_new_tokens(10, prompt, 2048)


def test_clamp_rejects_non_positive_request() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        clamp_max_new_tokens(0, 10, 2048)
