"""The engine's promises at the edges of a request's life: every admitted request is answered
(a cancel or a close while it is prepared), a slot is free before the result that frees it
arrives, a queue timeout never waits for a busy thread, and one request that cannot join the
batch, or whose prefill fails, fails alone. (Found by a second read of the engine; each test
failed on the code as first written.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from lumen_vlm.engine import Engine, EngineError, Unavailable
from lumen_vlm.fastvlm.exceptions import InputError
from lumen_vlm.fastvlm.fastvlm_model import GenerationParams, GenerationRequest
from lumen_vlm.generation import SamplingParams
from lumen_vlm.resources.settings import AdmissionSettings

from ..parity import golden_request

TIMEOUT = 5.0  # a bound on waiting for something that should come at once, never a speed


def with_tokens(case: dict[str, Any], tokens: int) -> GenerationRequest:
    request = golden_request(case)
    return replace(request, params=replace(request.params, max_new_tokens=tokens))


class HeldPrepare:
    """The real model, with every `prepare` (the preparing thread's work: image decode and the
    vision encoder, a second or more on a real model) held until `release()`."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.entered = threading.Event()
        self._released = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def release(self) -> None:
        self._released.set()

    def prepare(self, request: Any) -> Any:
        self.entered.set()
        self._released.wait(TIMEOUT)
        return self._model.prepare(request)


class PausedAfterFinishing:
    """The real model; when a sequence leaves the batch (the engine closes its prefill), the
    scheduler thread pauses there until `resume()` (at most 2 s), as a thread may be
    descheduled at any line: a test can see what a caller sees in that moment."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._resumed = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def resume(self) -> None:
        self._resumed.set()

    def prefill(self, prepared: Any, cache: Any, slot: int, chunk_tokens: int) -> Iterator[Any]:
        try:
            yield from self._model.prefill(prepared, cache, slot, chunk_tokens)
        finally:
            self._resumed.wait(2.0)


def test_a_finished_request_has_given_its_slot_back_when_its_result_arrives(
    fused_manager: Any, golden: dict[str, Any]
) -> None:
    """A client that sends its next request when the last one's result arrives is never refused
    because of its own finished request. On main the slot was released before the final
    response was yielded; the engine sends the result first (Sequence.sample) and frees the
    slot after (Engine._retire), so with max_queue 0 the next request is refused 'server busy'
    (and with a queue it waits behind its own finished request; `active` still counts it)."""
    model = PausedAfterFinishing(fused_manager)
    engine = Engine(model, AdmissionSettings(max_concurrency=1, max_queue=0))
    try:
        first = engine.submit(with_tokens(golden["cases"][0], 3)).result()
        assert len(first.token_ids) == 3
        second = engine.submit(with_tokens(golden["cases"][1], 3))
        model.resume()
        assert len(second.result().token_ids) == 3  # Unavailable: "server busy: 1 generations running"
    finally:
        model.resume()
        engine.close()


def test_cancel_all_stops_the_request_being_prepared_too(fused_manager: Any, golden: dict[str, Any]) -> None:
    """cancel_all marks the handles in _to_prepare, _ready, _joining and _running; the one the
    preparing thread holds at that moment is in none of them, so it runs to its end."""
    held = HeldPrepare(fused_manager)
    engine = Engine(held, AdmissionSettings(max_concurrency=2))
    try:
        handle = engine.submit(with_tokens(golden["cases"][0], 24))
        assert held.entered.wait(TIMEOUT)
        engine.cancel_all()
        held.release()
        with pytest.raises(Unavailable, match="the generation was cancelled"):
            handle.result()
    finally:
        held.release()
        engine.close()


def test_close_answers_every_admitted_request(fused_manager: Any, golden: dict[str, Any]) -> None:
    """close() while the preparing thread is busy: a request admitted behind it (in _to_prepare)
    must still get an event. The preparing thread returns at _stopping without answering what
    is left in _to_prepare, so that caller would wait forever."""
    held = HeldPrepare(fused_manager)
    engine = Engine(held, AdmissionSettings(max_concurrency=2))
    first = engine.submit(with_tokens(golden["cases"][0], 24))
    assert held.entered.wait(TIMEOUT)
    behind = engine.submit(with_tokens(golden["cases"][1], 24))
    closing = threading.Thread(target=engine.close, kwargs={"timeout": 0.2})
    closing.start()
    closing.join(TIMEOUT)
    held.release()
    try:
        assert first.done.wait(TIMEOUT), "the request being prepared was never answered"
        assert behind.done.wait(TIMEOUT), "a request admitted behind it was never answered"
        with pytest.raises(Unavailable):
            behind.result()
    finally:
        held.release()


def test_a_waiting_requests_queue_timeout_does_not_wait_for_a_busy_preparing_thread(
    fused_manager: Any, golden: dict[str, Any]
) -> None:
    """queue_timeout_s is checked by the preparing thread between preparations only, so while it
    encodes a photo (or while _to_prepare never empties under load) a waiting request is not
    answered. On main each waiting request checked its own timeout every 50 ms."""
    held = HeldPrepare(fused_manager)
    engine = Engine(held, AdmissionSettings(max_concurrency=1, max_queue=4, queue_timeout_s=0.2))
    try:
        running = engine.submit(with_tokens(golden["cases"][0], 3))
        assert held.entered.wait(TIMEOUT)
        waiting = engine.submit(with_tokens(golden["cases"][1], 3))
        answered = waiting.done.wait(10.0)  # 50 times its queue timeout
        held.release()
        assert answered, "the queue timeout waited for the preparing thread"
        with pytest.raises(Unavailable, match="no generation slot became free"):
            waiting.result()
        assert len(running.result().token_ids) == 3
    finally:
        held.release()
        engine.close()


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(8, SamplingParams(temperature=0.9, seed=-1)),  # numpy's default_rng refuses it
        GenerationParams(8, stop_sequences=("",)),  # StopSequenceFilter refuses it
    ],
    ids=["negative_seed", "empty_stop_sequence"],
)
def test_a_request_that_cannot_join_the_batch_fails_alone_and_the_engine_goes_on(
    fused_manager: Any, golden: dict[str, Any], params: GenerationParams
) -> None:
    """The engine is the transport-free API (the HTTP front door will submit to it): a request
    whose sampler or stop rules cannot be built must fail by itself. Today Sequence() is built
    in Engine._take_ready, under the lock and outside _schedule_loop's try, so the exception
    ends the scheduler thread: that request and every later one wait forever, and the slot
    it popped is lost."""
    case = golden["cases"][0]
    engine = Engine(fused_manager, AdmissionSettings(max_concurrency=2))
    try:
        bad = engine.submit(GenerationRequest(case["messages"], case["image_bytes"], params))
        assert bad.done.wait(TIMEOUT), "the bad request was never answered"
        with pytest.raises((InputError, EngineError)):
            bad.result()
        good = engine.submit(with_tokens(case, 4))
        assert good.done.wait(TIMEOUT), "the engine stopped serving after one bad request"
        assert list(good.result().token_ids) == case["output_ids"][:4]
    finally:
        engine.close(timeout=1.0)


class OnePrefillFails:
    """The real model, each decode step slowed a little (so a long request is still running
    when another joins), and the prefill of any request with `POISON` new tokens failing with
    a runtime error (as an ORT failure on one prompt would)."""

    POISON = 7

    def __init__(self, model: Any) -> None:
        self._model = model
        self.decoding = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def decode(self, cache: Any, slots: Any, tokens: Any) -> Any:
        self.decoding.set()
        threading.Event().wait(0.01)
        return self._model.decode(cache, slots, tokens)

    def prefill(self, prepared: Any, cache: Any, slot: int, chunk_tokens: int) -> Iterator[Any]:
        if prepared.max_new_tokens == self.POISON:
            raise RuntimeError("the decoder failed on this prompt")
        yield from self._model.prefill(prepared, cache, slot, chunk_tokens)


def test_a_prefill_that_fails_fails_that_request_only(fused_manager: Any, golden: dict[str, Any]) -> None:
    """Engine._prefill_chunk catches InputError only; any other error of one request's own
    prefill reaches _schedule_loop, whose _fail_batch fails every running and joining
    sequence, though none of them was in that call."""
    model = OnePrefillFails(fused_manager)
    engine = Engine(model, AdmissionSettings(max_concurrency=2))
    case = golden["cases"][0]
    try:
        running = engine.submit(with_tokens(case, 300))
        assert model.decoding.wait(TIMEOUT)
        failing = engine.submit(with_tokens(golden["cases"][1], OnePrefillFails.POISON))
        with pytest.raises(RuntimeError):
            failing.result()
        result = running.result()  # RuntimeError: the decoder failed on this prompt
        assert list(result.token_ids[:24]) == case["output_ids"]
    finally:
        engine.close()
