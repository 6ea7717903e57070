"""The HTTP front door's errors, and the one mapping of every error to an HTTP status.

The statuses are the same for both APIs but one: a full queue is 503 for Ollama (what Ollama
answers when its queue is full) and 429 for OpenAI (what its clients back off on); both carry
Retry-After. Each API writes the body in its own shape (`ollama.error_body`, `openai_api.error_body`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...engine import DeadlineExceeded, Overloaded, Unavailable
from ...fastvlm.exceptions import InputError

RETRY_AFTER_S = 1  # a slot frees within a generation; a client retrying sooner only adds load


class HttpError(Exception):
    """An error the front door itself finds (auth, routing, sizes); `status` is its HTTP status."""

    status = 400
    outcome = "invalid_request"  # the metrics' label

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, where one is


class Unauthorized(HttpError):
    status = 401
    outcome = "unauthorized"


class NotFound(HttpError):
    status = 404
    outcome = "not_found"


class BodyTooLarge(HttpError):
    status = 413


class BodyTimeout(HttpError):
    status = 408


class Unsupported(HttpError):
    """A feature the API has and this server does not (tools, logprobs, n > 1): said, not ignored."""


@dataclass(frozen=True)
class Status:
    code: int
    retry_after: bool = False


def status_for(error: BaseException, *, overloaded: int) -> Status:
    """The HTTP status of any error; `overloaded`: the API's status for a full queue."""
    if isinstance(error, HttpError):
        return Status(error.status)
    if isinstance(error, InputError):
        return Status(400)
    if isinstance(error, Overloaded):
        return Status(overloaded, retry_after=True)
    if isinstance(error, Unavailable):  # shutting down, or the model still loading
        return Status(503, retry_after=True)
    if isinstance(error, DeadlineExceeded):
        return Status(504)
    return Status(500)


def retry_headers(status: Status) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)} if status.retry_after else {}


INTERNAL_MESSAGE = "internal error while serving the request; see the server log"


def message_of(error: BaseException, status: Status) -> str:
    """What the client is told: the error's own words, except for our own bugs."""
    if status.code == 500:
        return INTERNAL_MESSAGE
    return str(error) or type(error).__name__
