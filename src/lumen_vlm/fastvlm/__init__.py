"""FastVLM: the model manager, its image and prompt handling, and the gRPC service over it.

`FastVLMService` (alias `GeneralFastVLMService`) is imported lazily, so code that only needs
the image or prompt modules does not pull in grpc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fastvlm_service import FastVLMService, GeneralFastVLMService

__all__ = ["FastVLMService", "GeneralFastVLMService"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import fastvlm_service

        return getattr(fastvlm_service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
