"""The gRPC adapter over the engine: a hub's own context that can only be polled still stops
its generation when its client goes, and a KV budget too small for its slots is a config
error, not a traceback."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from lumen_vlm.fastvlm import FastVLMService

from .conftest import ThrottledManager, image_bytes, make_request, make_settings, wait_until

TOKENS = 400  # the tiny model's context is 1024


class PollOnlyContext:
    """A hub's own context: `is_active` and `time_remaining`, no `add_callback` (CallControl
    reads each of them optionally; `watch_termination` says it then relies on is_active())."""

    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self) -> float | None:
        return None


def test_a_client_gone_on_a_context_without_add_callback_stops_its_generation(
    manager: Any, tiny_model_dir: Path
) -> None:
    """On main the manager polled control.check() (is_active) before every decode step, so a
    call that ended stopped its generation within a step on any context. The adapter now
    checks once before submitting and otherwise relies on add_callback: on a context without
    it, a non-streaming request whose client left runs all its tokens and holds its slot."""
    slow = ThrottledManager(manager, step_s=0.01)
    service = FastVLMService(slow, make_settings(tiny_model_dir))
    context = PollOnlyContext()
    request = make_request(image=image_bytes(), correlation_id="gone", max_new_tokens=str(TOKENS))
    responses: list[Any] = []
    call = threading.Thread(target=lambda: responses.extend(service.Infer(iter([request]), context)))
    try:
        call.start()
        assert wait_until(lambda: slow.events > 5)
        context.active = False  # the client went away
        assert wait_until(lambda: service.in_flight == 0)
        call.join(30)
        assert min(slow.finished) < TOKENS, "the generation ran to its end after its client left"
    finally:
        slow.release()
        call.join(30)
        service.close()


def test_a_kv_budget_too_small_for_its_slots_is_a_config_error_naming_the_key(
    manager: Any, tiny_model_dir: Path
) -> None:
    """kv_cache_tokens 4 over max_concurrency 4 leaves one token a slot. Engine() raises a
    ValueError, which server.run does not catch (it maps ResourceError to exit status 2 with
    the message), so the process ends in a traceback after the model loaded."""
    from lumen_vlm.resources.exceptions import ResourceError

    with pytest.raises(ResourceError, match="kv_cache_tokens"):
        FastVLMService(manager, make_settings(tiny_model_dir, max_concurrency=4, kv_cache_tokens=4)).close()
