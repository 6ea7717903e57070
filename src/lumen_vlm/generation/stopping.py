"""When to stop generating, and keeping stop sequences out of the streamed text."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

__all__ = ["FinishReason", "StopSequenceFilter", "clamp_max_new_tokens"]


class FinishReason(str, Enum):
    """Why generation ended; the values are the strings sent on the wire."""

    EOS = "eos_token"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"


class StopSequenceFilter:
    """Streams text deltas through, cutting the output before the first stop sequence.

    A stop sequence can straddle deltas, so text that could still turn into one (a suffix that is a
    proper prefix of some stop sequence) is held back until the next delta decides it.
    """

    def __init__(self, stop_sequences: Sequence[str]) -> None:
        if any(stop == "" for stop in stop_sequences):
            raise ValueError("stop sequences must be non-empty strings")
        self._stops = tuple(dict.fromkeys(stop_sequences))
        self._pending = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop sequence was hit)."""
        if self._stopped:
            return "", True
        self._pending += delta
        stop_at = self._earliest_stop(self._pending)
        if stop_at is not None:
            self._stopped = True
            safe, self._pending = self._pending[:stop_at], ""
            return safe, True
        keep = self._held_back_length(self._pending)
        safe_end = len(self._pending) - keep
        safe, self._pending = self._pending[:safe_end], self._pending[safe_end:]
        return safe, False

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason (EOS, length)."""
        released, self._pending = self._pending, ""
        return released

    def _earliest_stop(self, text: str) -> int | None:
        positions = [index for stop in self._stops if (index := text.find(stop)) >= 0]
        return min(positions, default=None)

    def _held_back_length(self, text: str) -> int:
        # Longest suffix of text that is a proper prefix of a stop sequence (no full match exists here).
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


def clamp_max_new_tokens(requested: int, prompt_tokens: int, context_length: int) -> int:
    """Limit the generation budget to the room the prompt leaves in the context window."""
    if requested < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {requested}")
    room = context_length - prompt_tokens
    if room <= 0:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens leaves no room to generate in a context of {context_length}"
        )
    return min(requested, room)
