"""The engine's errors. Each front door maps them (and the model room's `InputError`) to its own
codes in one place: gRPC's in `fastvlm/fastvlm_service.error_code_for`."""

from __future__ import annotations

# What a generation cancelled by the server's shutdown is answered (UNAVAILABLE).
CANCELLED_AT_SHUTDOWN = "the server is shutting down; the generation was cancelled"
SHUTTING_DOWN = "the server is shutting down"


class EngineError(Exception):
    """A request the engine did not complete."""


class Unavailable(EngineError):
    """Overloaded, shutting down or not ready: the client may retry later."""


class Overloaded(Unavailable):
    """Every slot is busy and the queue is full, or no slot freed within the queue timeout: the
    client should back off and retry (HTTP's 429 or 503, with Retry-After)."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it finished."""


class ClientGone(EngineError):
    """The request was cancelled by its caller (a client that went away): nothing to answer."""
