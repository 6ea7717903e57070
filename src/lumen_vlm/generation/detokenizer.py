"""Streaming token-to-text conversion that never emits half of a UTF-8 character.

Byte-level BPE splits a CJK character or an emoji over several tokens, and decoding a prefix of
them yields U+FFFD. Following vLLM/TGI, text is decoded over a short window of recent ids:
``ids[prefix_offset:read_offset]`` is text already emitted (kept as context, because some decoders
render a token differently at the start of a string) and ``ids[read_offset:]`` is pending. The
pending suffix is released once the window's decode no longer ends in U+FFFD.
"""

from __future__ import annotations

from tokenizers import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals a full decode."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._pieces: list[str] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._flushed = False

    @property
    def text(self) -> str:
        """Everything emitted so far by :meth:`push` and :meth:`flush`."""
        return "".join(self._pieces)

    @property
    def token_count(self) -> int:
        return len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it makes final (often "" mid-character)."""
        if self._flushed:
            raise RuntimeError("push() after flush(): the detokenizer has already been finalised")
        self._ids.append(int(token_id))
        emitted_text, window_text = self._decode_window()
        if len(window_text) <= len(emitted_text) or window_text.endswith(_REPLACEMENT_CHAR):
            return ""
        # The window has advanced to a character boundary: the old pending ids become context.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._emit(window_text[len(emitted_text) :])

    def flush(self) -> str:
        """Release whatever is still held back, with incomplete bytes decoded as U+FFFD."""
        if self._flushed:
            return ""
        self._flushed = True
        emitted_text, window_text = self._decode_window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._emit(window_text[len(emitted_text) :])

    def _decode_window(self) -> tuple[str, str]:
        context = self._ids[self._prefix_offset : self._read_offset]
        window = self._ids[self._prefix_offset :]
        return self._decode(context), self._decode(window)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta
