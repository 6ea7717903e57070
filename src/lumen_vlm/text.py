"""Client text in our own messages: errors and logs show a short, escaped prefix of it.

A meta value, a role, a MIME type or a task name comes from the client and can be megabytes
long; anything that echoes one goes through `shown`, so an error response or an INFO log line
stays short whatever was sent, and a lone surrogate or a control character is escaped.
"""

from __future__ import annotations

SHOWN_CHARS = 40


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` for an error message: its first `limit` characters, repr-escaped, "..." if cut."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def invalid_text(value: str) -> str | None:
    """Why `value` is not valid text, or None when it is.

    A Python string from JSON may hold a lone surrogate (the escape ``"\\ud800"`` decodes to
    one); it cannot be encoded as UTF-8, so the tokenizer and protobuf both refuse it.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"it holds a lone surrogate {shown(value[exc.start])} at character {exc.start} "
            "(send the character itself or a complete surrogate pair)"
        )
    return None
