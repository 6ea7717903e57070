"""The engine room: admission, scheduling and batched decoding, behind a transport-free API.

Front doors (gRPC today, HTTP next, the CLI's describe) submit `GenerationRequest`s and read
each request's events from its `RequestHandle`.
"""

from ..fastvlm.fastvlm_model import GenerationParams, GenerationRequest
from .engine import Engine, batch_slots
from .errors import CANCELLED_AT_SHUTDOWN, ClientGone, DeadlineExceeded, EngineError, Overloaded, Unavailable
from .events import GenerationEvent, GenerationResult, TextDelta
from .handle import RequestHandle

__all__ = [
    "CANCELLED_AT_SHUTDOWN",
    "ClientGone",
    "DeadlineExceeded",
    "Engine",
    "EngineError",
    "GenerationEvent",
    "GenerationParams",
    "GenerationRequest",
    "GenerationResult",
    "Overloaded",
    "RequestHandle",
    "TextDelta",
    "Unavailable",
    "batch_slots",
]
