"""Is a text the start of some JSON document? For answers cut by max_new_tokens inside a JSON value.

An independent check (a small recursive-descent reader, not the grammar engine under test):
it reads the text as JSON and answers True when the text ends before the document does, with
nothing wrong up to there; False at the first character that no JSON document could have there.
"""

from __future__ import annotations

WHITESPACE = " \t\n\r"
ESCAPES = '"\\/bfnrtu'
HEX = "0123456789abcdefABCDEF"
DIGITS = "0123456789"


class _End(Exception):
    """The text ended inside the document."""


class _Wrong(Exception):
    """No JSON document has this character here."""


class _Reader:
    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0

    def peek(self) -> str:
        if self.at >= len(self.text):
            raise _End
        return self.text[self.at]

    def take(self, allowed: str) -> str:
        char = self.peek()
        if char not in allowed:
            raise _Wrong(f"{char!r} at {self.at}")
        self.at += 1
        return char

    def spaces(self) -> None:
        while self.at < len(self.text) and self.text[self.at] in WHITESPACE:
            self.at += 1

    def value(self) -> None:
        self.spaces()
        char = self.peek()
        if char == "{":
            self.members("}", self.member)
        elif char == "[":
            self.members("]", self.value)
        elif char == '"':
            self.string()
        elif char in "-" + DIGITS:
            self.number()
        else:
            for literal in ("true", "false", "null"):
                if literal.startswith(char):
                    for expected in literal:
                        self.take(expected)
                    return
            raise _Wrong(f"{char!r} at {self.at}")

    def members(self, close: str, item: object) -> None:
        self.at += 1
        self.spaces()
        if self.peek() == close:
            self.at += 1
            return
        while True:
            item()  # type: ignore[operator]
            self.spaces()
            if self.take("," + close) == close:
                return

    def member(self) -> None:
        self.spaces()
        if self.peek() != '"':
            raise _Wrong(f"a key must be a string, at {self.at}")
        self.string()
        self.spaces()
        self.take(":")
        self.value()

    def string(self) -> None:
        self.at += 1
        while True:
            char = self.peek()
            self.at += 1
            if char == '"':
                return
            if char == "\\":
                if self.take(ESCAPES) == "u":
                    for _ in range(4):
                        self.take(HEX)
            elif ord(char) < 0x20:
                raise _Wrong(f"a control character in a string, at {self.at - 1}")

    def number(self) -> None:
        if self.peek() == "-":
            self.at += 1
        if self.take(DIGITS) != "0":
            self.digits()
        if self._next_is("."):
            self.at += 1
            self.take(DIGITS)
            self.digits()
        if self._next_is("eE"):
            self.at += 1
            if self.peek() in "+-":
                self.at += 1
            self.take(DIGITS)
            self.digits()

    def digits(self) -> None:
        while self._next_is(DIGITS):
            self.at += 1

    def _next_is(self, chars: str) -> bool:
        return self.at < len(self.text) and self.text[self.at] in chars


def is_json_prefix(text: str) -> bool:
    """True when `text` is the start of a JSON document (a whole document counts too)."""
    reader = _Reader(text)
    try:
        reader.value()
        reader.spaces()
    except _End:
        return True
    except _Wrong:
        return False
    return reader.at == len(text)
