"""One sequence's output: every per-sequence stop rule (EOS, length, stop strings) in one place.

A decode loop, alone or batched, pushes each sampled token and learns the text that token makes
final and, once the sequence is done, why. Nothing here touches the model: it is tokens in, text
and a finish reason out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

from lumen_vlm.generation.detokenizer import IncrementalDetokenizer
from lumen_vlm.generation.stopping import FinishReason, StopSequenceFilter

__all__ = ["SequenceText"]


class SequenceText:
    """One sequence's output: tokens in, text deltas and the finish reason out.

    The rules, in the order they are checked for each pushed token:

    - an EOS token finishes the sequence with EOS; the token itself adds no text, and whatever
      was held back (an unfinished character, a possible start of a stop string) is released;
    - a stop string finishes it with STOP_SEQUENCE; the text is cut just before the stop string;
    - the ``max_new_tokens``-th token finishes it with LENGTH, releasing what was held back
      (an unfinished UTF-8 character as U+FFFD).

    A stop string that only the final release completes still finishes with STOP_SEQUENCE and is
    cut, whatever ended the sequence first: no stop string is ever emitted.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        eos_token_ids: Iterable[int],
        max_new_tokens: int,
        stop_sequences: Sequence[str],
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._eos_token_ids = frozenset(eos_token_ids)
        self._max_new_tokens = max_new_tokens
        # Special tokens (the chat template's markers) never reach the client's text.
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._stop_filter = StopSequenceFilter(stop_sequences)
        self._token_ids: list[int] = []
        self._pieces: list[str] = []
        self._finish_reason: FinishReason | None = None

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the sequence ended; None while it goes on."""
        return self._finish_reason

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every token pushed, a final EOS included."""
        return tuple(self._token_ids)

    @property
    def text(self) -> str:
        """Everything :meth:`push` has returned so far, joined."""
        return "".join(self._pieces)

    @property
    def generated_tokens(self) -> int:
        return len(self._token_ids)

    def push(self, token_id: int) -> str:
        """Add one sampled token; return the text it makes final ("" is common).

        After the token that finishes the sequence, the return value includes everything that
        was held back, so the joined return values are the whole output.
        """
        if self._finish_reason is not None:
            raise RuntimeError(f"push() after the sequence finished ({self._finish_reason.value})")
        token_id = int(token_id)
        self._token_ids.append(token_id)
        if token_id in self._eos_token_ids:
            return self._emit(self._finish(FinishReason.EOS))
        text, stopped = self._stop_filter.feed(self._detokenizer.push(token_id))
        if stopped:
            self._finish_reason = FinishReason.STOP_SEQUENCE
        elif len(self._token_ids) >= self._max_new_tokens:
            text += self._finish(FinishReason.LENGTH)
        return self._emit(text)

    def _finish(self, reason: FinishReason) -> str:
        """End with `reason` and return the held-back text, unless that text completes a stop string."""
        text, stopped = self._stop_filter.feed(self._detokenizer.flush())
        if stopped:
            self._finish_reason = FinishReason.STOP_SEQUENCE
            return text
        self._finish_reason = reason
        return text + self._stop_filter.flush()

    def _emit(self, text: str) -> str:
        if text:
            self._pieces.append(text)
        return text
