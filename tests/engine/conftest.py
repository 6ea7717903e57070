"""Helpers for the engine's tests (the fused tiny model, `fused_manager`, is the root conftest's)."""

from __future__ import annotations

import time
from typing import Any


class BatchRecorder:
    """The real model, recording how many sequences each decode step carried; with `step_s`, each
    step also lasts at least that long, so that requests sent together are sure to overlap."""

    def __init__(self, model: Any, step_s: float = 0.0) -> None:
        self._model = model
        self.step_s = step_s
        self.batch_sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def decode(self, cache: Any, slots: Any, tokens: Any) -> Any:
        self.batch_sizes.append(len(slots))
        time.sleep(self.step_s)
        return self._model.decode(cache, slots, tokens)
