"""Client text in our own messages: errors and logs show a short, escaped prefix of it.

A meta value, a role, a MIME type, a task name or a correlation_id comes from the client and
can be megabytes long or hold a newline; anything that echoes one, in an error response or in
a log line at any level, goes through `shown`. Its repr escapes every control character (so
a client cannot start a forged log line) and a lone surrogate, and its cut keeps the line
short whatever was sent. The cuts differ by what is shown, and all live here.
"""

from __future__ import annotations

from collections.abc import Sequence

# A meta value, a role, a MIME type, a task name, a meta key.
SHOWN_CHARS = 40
# A correlation_id is shown whole up to the longest one the service accepts (256 UTF-8 bytes,
# request_meta.MAX_CORRELATION_ID_BYTES, so never more than 256 characters): an accepted
# id stays greppable; only a refused, overlong one is cut.
SHOWN_ID_CHARS = 256
# Messages or a rendered prompt in a DEBUG line: enough to recognise the request.
SHOWN_TEXT_CHARS = 500
# How many items of a client-made list (unknown meta keys) a line names before a count.
SHOWN_ITEMS = 8


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` for an error message or a log line: its first `limit` characters, repr-escaped, "..." if cut."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def shown_id(correlation_id: str) -> str:
    """A correlation_id for a log line (`shown` with the id's cut)."""
    return shown(correlation_id, SHOWN_ID_CHARS)


def shown_list(values: Sequence[str]) -> str:
    """The first `SHOWN_ITEMS` of `values`, each `shown`, then how many there are in all."""
    named = ", ".join(shown(value) for value in values[:SHOWN_ITEMS])
    return named if len(values) <= SHOWN_ITEMS else f"{named}, ... ({len(values)} in all)"


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
